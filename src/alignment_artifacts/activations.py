"""Activation collection: pooled activations at chosen sites, positions and layers, cached.

Only what analysis needs is kept: one vector per prompt, site, layer and position (or one per
generated step), in float16 by default. A run is keyed by everything that changes its content;
it writes one part file per batch (atomic renames), so an interrupted run resumes where it
stopped, and the manifest, written last, is what marks a store complete. A resumed run checks
each part file it reuses (tensor names, shapes, checksum) and recomputes any that fail. The pass
itself (what is recorded, run from the prompts' shared prefix) is ``activation_pass``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .activation_pass import (
    CollectionPlan,
    EncodedPrompt,
    Recorder,
    collection_prefix,
    encode_prompt,
    parse_layers,
    parse_positions,
    parse_sites,
    run_with_backoff,
)
from .cache import (
    atomic_save_safetensors,
    atomic_write_json,
    cache_dir,
    exclusive,
    load_verified,
    save_verified,
    stable_hash,
)
from .errors import CacheError, UserError
from .models.adapter import SITES
from .models.hooks import site_hooks
from .models.loading import LoadedModel
from .models.prefix import SharedPrefix
from .models.thinking import post_think_kwargs, thinking_format
from .prompts.sets import Prompt, PromptSet

FORMAT_VERSION = 1
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ActivationStore:
    """Pooled activations for one prompt set: ``get(site, layer, position) -> [n, hidden]``."""

    prompts: list[Prompt]
    sites: list[str]
    layers: list[int]
    positions: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    tensors: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    cache_hit: bool = False

    def get(self, site: str, layer: int, position: str) -> torch.Tensor:
        key = (site, layer, position)
        if key not in self.tensors:
            if site not in self.sites or layer not in self.layers or position not in self.positions:
                raise UserError(f"This store has no activations for site={site}, layer={layer}, position={position}. "
                                f"It holds sites {self.sites}, layers {self.layers[0]}-{self.layers[-1]}, positions "
                                f"{self.positions}; collect again with those options.")
            raise KeyError(key)
        return self.tensors[key].float()

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([p.label for p in self.prompts])

    @classmethod
    def from_tensors(cls, prompts: list[Prompt], tensors: dict[tuple[str, int, str], torch.Tensor],
                     manifest: dict[str, Any] | None = None) -> ActivationStore:
        sites = sorted({k[0] for k in tensors}, key=lambda s: SITES.index(s) if s in SITES else 99)
        layers = sorted({k[1] for k in tensors})
        positions = list(dict.fromkeys(k[2] for k in tensors))
        return cls(list(prompts), sites, layers, positions, dict(manifest or {}), dict(tensors))

    @classmethod
    def load(cls, folder: str | Path) -> ActivationStore:
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{folder} is not a complete activation store (no manifest.json). Collect it again.")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise CacheError(f"The activation manifest {manifest_path} is corrupt ({exc}). Delete {folder} and "
                             "collect again.") from exc
        prompts = [Prompt(**p) for p in manifest["prompts"]]
        tensors: dict[tuple[str, int, str], torch.Tensor] = {}
        for site in manifest["sites"]:
            try:
                data = load_file(str(folder / f"{site}.safetensors"))
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise CacheError(f"The activation file {folder / (site + '.safetensors')} is corrupt ({exc}). "
                                 f"Delete {folder} and collect again.") from exc
            for name, tensor in data.items():
                position, layer = name.rsplit(".", 1)
                tensors[(site, int(layer), position)] = tensor
        return cls(prompts, manifest["sites"], manifest["layers"], manifest["positions"], manifest, tensors,
                   path=folder, cache_hit=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def store_key(loaded: LoadedModel, prompt_set: PromptSet, plan: CollectionPlan) -> str:
    template = getattr(loaded.tokenizer, "chat_template", None) or "plain"
    return stable_hash({
        "format": FORMAT_VERSION, "weights": loaded.info.weights_hash, "compute_dtype": loaded.info.dtype,
        "template": stable_hash(template), "prompts": prompt_set.content_hash(), "sites": plan.sites,
        "positions": plan.positions, "layers": plan.layers, "store_dtype": plan.store_dtype,
        "system": plan.system, "max_length": plan.max_length,
        **({"template_kwargs": plan.template_kwargs} if plan.template_kwargs else {}),
    })


def collect_activations(loaded: LoadedModel, prompt_set: PromptSet, sites: Sequence[str] | str | None = None,
                        positions: Sequence[str] | str | None = None, layers: Sequence[int] | str | None = None,
                        dtype: str = "float16", batch_size: int | str = "auto", system: str | None = None,
                        use_cache: bool = True, progress: bool = True, cache_folder: Path | None = None,
                        truncate: bool = False, model_lock: contextlib.AbstractContextManager[Any] | None = None,
                        thinking: str = "auto") -> ActivationStore:
    """Collect pooled activations for every prompt; returns a cached store when one exists.

    ``thinking`` (auto, on, off) renders reasoning models' prompts with the template's thinking
    switch; the ``post_think`` position needs the block closed in the prompt (auto then means off).

    ``use_cache=False`` recomputes everything, part files of an interrupted run included.
    ``model_lock`` is held around each batch's forward pass (and its hooks), so a server can
    answer other requests between batches.
    """
    if not len(prompt_set):
        raise UserError("The prompt set is empty: nothing to collect.")
    if dtype not in STORE_DTYPES:
        raise UserError(f"Unknown activation dtype '{dtype}'. Use one of: {', '.join(STORE_DTYPES)}.")
    plan = CollectionPlan(sites=parse_sites(sites), positions=parse_positions(positions),
                          layers=parse_layers(layers, loaded.adapter.n_layers), store_dtype=dtype, system=system,
                          batch_size=batch_size,
                          max_length=getattr(loaded.model.config, "max_position_embeddings", None))
    plan.template_kwargs = (post_think_kwargs(loaded.tokenizer, thinking) if "post_think" in plan.positions
                            else thinking_format(loaded.tokenizer, thinking).kwargs)
    encoded = [encode_prompt(loaded.tokenizer, p.text, system, plan.max_length, truncate, plan.generated_steps,
                             plan.template_kwargs) for p in prompt_set.prompts]
    if "post_think" in plan.positions and any(e.think_end is None for e in encoded):
        raise UserError("The position post_think needs a thinking block (<think>...</think>) that closes in the "
                        f"prompt, and this model's chat template renders none ({loaded.info.name} is not a "
                        "reasoning model, or its template has no thinking switch). Use last or first_generated.")
    key = store_key(loaded, prompt_set, plan)
    folder = cache_folder or cache_dir("activations", key)
    parts = folder.parent / f".{folder.name}.parts"
    lock = folder.parent / f".{folder.name}.lock"
    if use_cache and (folder / "manifest.json").is_file():
        return _load_finished(folder, parts, lock)
    started = time.perf_counter()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))  # less padding per batch
    size = _initial_batch_size(batch_size, loaded)
    with exclusive(lock):
        if use_cache and (folder / "manifest.json").is_file():  # another process finished it meanwhile
            return ActivationStore.load(folder)
        if not use_cache:
            shutil.rmtree(parts, ignore_errors=True)
        run = _Run(loaded, prompt_set, plan, key, folder, parts, encoded, started, model_lock)
        return run.collect(order, size, progress)


def _load_finished(folder: Path, parts: Path, lock: Path) -> ActivationStore:
    """The complete store; part files a killed run left after finishing it are removed first."""
    if parts.exists():
        with exclusive(lock):
            shutil.rmtree(parts, ignore_errors=True)
    return ActivationStore.load(folder)


@dataclass
class _Run:
    """One collection into a parts folder: resumes from valid parts, then merges them into the store."""

    loaded: LoadedModel
    prompt_set: PromptSet
    plan: CollectionPlan
    key: str
    folder: Path
    parts: Path
    encoded: list[EncodedPrompt]
    started: float
    model_lock: contextlib.AbstractContextManager[Any] | None = None
    earlier_seconds: float = 0.0  # collection time of interrupted runs whose parts are reused
    resumed: bool = False

    def collect(self, order: list[int], size: int, progress: bool) -> ActivationStore:
        self.parts.mkdir(parents=True, exist_ok=True)
        plan_path = self.parts / "plan.json"
        if _read_json(plan_path).get("batch") != size and any(self.parts.iterdir()):
            shutil.rmtree(self.parts)  # another batch size (or an unreadable plan): batches would differ
            self.parts.mkdir(parents=True)
        atomic_write_json(plan_path, {"batch": size, "key": self.key})
        recorder = Recorder(self.plan, STORE_DTYPES[self.plan.store_dtype])
        hooks = {(site, layer): recorder.hook(site, layer) for site in self.plan.sites for layer in self.plan.layers}
        names = {f"{s}|{layer}|{p}" for s in self.plan.sites for layer in self.plan.layers for p in self.plan.positions}
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        bar = _progress(len(self.prompt_set), progress, "collect")
        guard = self.model_lock if self.model_lock is not None else contextlib.nullcontext()
        prefix: SharedPrefix | None = None  # run before the first batch that is not reused
        for number, rows in enumerate(batches):
            part = self.parts / f"batch-{number:05d}.safetensors"
            if self._reusable(part, names, len(rows)):
                bar.update(len(rows))
                continue
            with guard:
                prefix = prefix or collection_prefix(self.loaded, self.encoded)
                with site_hooks(self.loaded.adapter, hooks):
                    pooled = run_with_backoff(self.loaded, recorder, [self.encoded[i] for i in rows], self.plan,
                                              prefix)
            tensors = {f"{s}|{layer}|{p}": t for (s, layer, p), t in pooled.items()}
            save_verified(tensors, part, {"seconds": f"{self.seconds():.3f}"})
            bar.update(len(rows))
        bar.close()
        return _finalise(self, batches)

    def seconds(self) -> float:
        """Collection time so far, interrupted runs included."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def _reusable(self, part: Path, names: set[str], rows: int) -> bool:
        """Whether a part file left by an earlier run is whole; a damaged one is removed (and recomputed)."""
        if not part.is_file():
            return False
        try:
            tensors, metadata = load_verified(part)
            problem = _part_problem(tensors, metadata, names, rows, STORE_DTYPES[self.plan.store_dtype])
        except CacheError as exc:
            problem = str(exc)
        if problem:
            warnings.warn(f"Discarded the part file {part} of an interrupted collection ({problem}); its batch is "
                          "being recomputed.", stacklevel=2)
            part.unlink(missing_ok=True)
            return False
        self.resumed = True
        self.earlier_seconds = max(self.earlier_seconds, float(metadata["seconds"]))
        return True


def _part_problem(tensors: dict[str, torch.Tensor], metadata: dict[str, str], names: set[str], rows: int,
                  dtype: torch.dtype) -> str | None:
    """What is wrong with a part file's contents, or None."""
    if set(tensors) != names:
        return "unexpected tensor names"
    if any(t.shape[0] != rows or t.dtype != dtype for t in tensors.values()):
        return "unexpected shape or dtype"
    try:
        float(metadata.get("seconds", ""))
    except ValueError:
        return "no timing"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON file of ours, or {} when it is missing or damaged (then what it describes is redone)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _initial_batch_size(batch_size: int | str, loaded: LoadedModel) -> int:
    if isinstance(batch_size, int) or str(batch_size).isdigit():
        value = int(batch_size)
        if value < 1:
            raise UserError(f"--batch-size must be at least 1 (got {value}).")
        return value
    if batch_size != "auto":
        raise UserError(f"--batch-size must be a positive number or 'auto' (got {batch_size!r}).")
    return 64 if loaded.device.type == "cuda" else 16


def _finalise(run: _Run, batches: list[list[int]]) -> ActivationStore:
    from safetensors.torch import load_file

    parts, folder, prompt_set, plan, loaded, encoded = (run.parts, run.folder, run.prompt_set, run.plan, run.loaded,
                                                        run.encoded)
    chunks = [load_file(str(parts / f"batch-{i:05d}.safetensors")) for i in range(len(batches))]
    order = torch.tensor([row for rows in batches for row in rows])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    tensors: dict[tuple[str, int, str], torch.Tensor] = {}
    for name in chunks[0]:
        site, layer, position = name.split("|")
        stacked = chunks[0][name] if len(chunks) == 1 else _cat_all([c[name] for c in chunks])
        tensors[(site, int(layer), position)] = stacked[inverse].contiguous()
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for site in plan.sites:
        atomic_save_safetensors({f"{p}.{layer}": t for (s, layer, p), t in tensors.items() if s == site},
                                tmp / f"{site}.safetensors")
    mean_tokens = sum(len(e.ids) for e in encoded) / len(encoded)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    itemsize = torch.tensor([], dtype=STORE_DTYPES[plan.store_dtype]).element_size()
    full = loaded.adapter.n_layers * mean_tokens * loaded.adapter.hidden_size * itemsize
    manifest = {
        "format_version": FORMAT_VERSION, "key": run.key, "package_version": __version__,
        "model_id": loaded.info.name, "weights_hash": loaded.info.weights_hash, "model_type": loaded.info.model_type,
        "compute_dtype": loaded.info.dtype, "dtype": plan.store_dtype, "hidden_size": loaded.adapter.hidden_size,
        "n_layers": loaded.adapter.n_layers,
        "chat_template_hash": stable_hash(getattr(loaded.tokenizer, "chat_template", None) or "plain"),
        "system": plan.system, "template_kwargs": plan.template_kwargs,
        "prompt_set_name": prompt_set.name, "prompt_set_hash": prompt_set.content_hash(),
        "categories": prompt_set.categories, "sites": plan.sites, "positions": plan.positions, "layers": plan.layers,
        "n_prompts": len(prompt_set), "mean_prompt_tokens": round(mean_tokens, 2),
        "bytes_per_prompt": round(stored / len(prompt_set), 1),
        "full_capture_bytes_per_prompt": round(full, 1),
        "storage_ratio_vs_full_mlp_capture": round(stored / len(prompt_set) / full, 6),
        "seconds": round(run.seconds(), 2), "resumed": run.resumed,
        "earlier_seconds": round(run.earlier_seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "prompts": [vars(p) for p in prompt_set.prompts],
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    shutil.rmtree(parts, ignore_errors=True)
    return ActivationStore(list(prompt_set.prompts), plan.sites, plan.layers, plan.positions, manifest, tensors,
                           path=folder, cache_hit=False)


def _cat_all(values: list[torch.Tensor]) -> torch.Tensor:
    if values[0].dim() == 3:
        keep = min(v.shape[1] for v in values)
        values = [v[:, -keep:] for v in values]
    return torch.cat(values)


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, leave=False)


def storage_summary(store: ActivationStore) -> dict[str, float]:
    m = store.manifest
    return {"bytes_per_prompt": m.get("bytes_per_prompt", math.nan),
            "full_capture_bytes_per_prompt": m.get("full_capture_bytes_per_prompt", math.nan),
            "ratio": m.get("storage_ratio_vs_full_mlp_capture", math.nan)}

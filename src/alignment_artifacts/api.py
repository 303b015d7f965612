"""The Python API: the pipeline in a few calls, with models kept loaded across calls."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .activations import collect_activations
from .analysis.directions import DirectionSet, compute_directions
from .cache import cache_dir, cache_root, stable_hash
from .errors import CacheError, UserError
from .models import DEFAULT_MODEL, GenerationConfig, LoadedModel, generate, load_model
from .prompts import BUILTIN_SETS, PromptSet, resolve_prompts
from .steering import SteeringConfig, SteeringHandle, apply_steering

_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def get_model(model: str | LoadedModel | None = None, device: str = "auto", dtype: str = "auto",
              **kwargs: Any) -> LoadedModel:
    """A loaded model, reusing one already loaded in this process."""
    if isinstance(model, LoadedModel):
        return model
    name = model or DEFAULT_MODEL
    key = (name, device, str(dtype))
    if key not in _MODELS:
        _MODELS[key] = load_model(name, device=device, dtype=dtype, **kwargs)
    return _MODELS[key]


def default_direction_layer(n_layers: int) -> int:
    """Where a refusal direction is read when nothing better was measured: about 60% of the depth."""
    return max(0, min(n_layers - 1, round(0.6 * n_layers)))


def config_path(loaded: LoadedModel) -> Path:
    return cache_dir("configs", f"{loaded.info.name.replace('/', '--')}.json")


def stored_config(loaded: LoadedModel) -> SteeringConfig | None:
    """The configuration `optimize` stored for this model, if it matches these weights."""
    path = config_path(loaded)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"The stored configuration {path} is corrupt ({exc}). Delete it, or run `optimize` "
                         "again to replace it.") from exc
    config = SteeringConfig.from_json(data.get("config", data))
    if config.weights_hash and config.weights_hash != loaded.info.weights_hash:
        warnings.warn(f"Ignoring the stored configuration {path}: it was optimised for other weights "
                      f"({config.weights_hash}, this model is {loaded.info.weights_hash}).", stacklevel=2)
        return None
    return config


def resolve_config(loaded: LoadedModel, config: SteeringConfig) -> SteeringConfig:
    """Turn ``auto`` into the measured best configuration, and fill mode defaults."""
    if config.mode == "auto":
        best = stored_config(loaded)
        if best is not None:
            overrides: dict[str, Any] = {"scale": config.scale} if config.notes.get("scale_given") else {}
            config = replace(best, **overrides)
            config.notes = {**config.notes, "auto": "stored optimize result"}
        else:
            config = replace(config, mode="ablate", notes={**config.notes, "auto": "ablate default (no stored "
                                                                                   "optimize result)"})
            if not config.notes.get("scale_given"):
                config.scale = 1.0
    if config.uses_refusal_direction and config.direction_layer is None:
        config = replace(config, direction_layer=default_direction_layer(loaded.adapter.n_layers))
    config.validate(loaded.adapter.n_layers)
    return config


def get_directions(loaded: LoadedModel, config: SteeringConfig | None = None, *,
                   source: str | PromptSet | None = None,
                   site: str | None = None, position: str | None = None, categories: list[str] | None = None,
                   progress: bool = True, model_lock: contextlib.AbstractContextManager[Any] | None = None
                   ) -> DirectionSet:
    """Directions for a model: collected and computed on first use, then read from the cache.

    ``model_lock`` is held around each forward pass of a collection (a server shares its model).
    """
    config = config or SteeringConfig(mode="always")
    source = source or config.resolved_source()
    site = site or config.resolved_direction_site()
    position = position or config.resolved_direction_position()
    categories = categories if categories is not None else config.categories
    stored = _stored_directions(source) if isinstance(source, str) else None
    if isinstance(source, PromptSet):
        prompt_set = source
    elif stored is not None:
        directions = DirectionSet.load(stored)
        directions.check_compatible(loaded.adapter.hidden_size, loaded.info.weights_hash, loaded.info.name)
        return directions
    else:
        _check_source_exists(source)
        prompt_set = resolve_prompts(source)
    key = stable_hash({"weights": loaded.info.weights_hash, "dtype": loaded.info.dtype,
                       "prompts": prompt_set.content_hash(), "site": site, "position": position,
                       "categories": categories, "pca": config.pca_components})
    folder = cache_dir("directions", key)
    if (folder / "directions.json").is_file():
        return DirectionSet.load(folder)
    store = collect_activations(loaded, prompt_set, sites=[site], positions=[position], progress=progress,
                                model_lock=model_lock)
    directions = compute_directions(store, site, position, categories=categories,
                                    pca_components=max(config.pca_components, 5))
    directions.save(folder)
    return directions


def _stored_directions(source: str) -> Path | None:
    """A directions folder named by ``source``: a path, or one relative to the cache root (how
    stored configurations name theirs, so a moved cache or ``--cache-dir`` keeps working)."""
    for folder in (Path(source).expanduser(), cache_root() / source):
        if folder.is_dir():
            return folder
    return None


def _check_source_exists(source: str) -> None:
    """A path that names nothing gets that said, not an error about its (missing) file extension."""
    path = Path(source).expanduser()
    looks_like_path = "/" in source or source.startswith(("~", ".")) or path.suffix != ""
    if looks_like_path and "," not in source and not source.startswith("hf:") and not path.exists():
        raise UserError(f"The direction source {path} does not exist (resolved to {path.absolute()}). Pass a saved "
                        "directions folder (with directions.json, e.g. from `export --format vectors`), a prompt "
                        f"file, or a builtin prompt set ({', '.join(BUILTIN_SETS)}).")


@contextlib.contextmanager
def steer(loaded: LoadedModel, config: SteeringConfig | None = None, directions: DirectionSet | None = None,
          **options: Any) -> Iterator[SteeringHandle]:
    """Context manager around any forward or ``generate`` call: steering on inside, off after."""
    config = resolve_config(loaded, config or SteeringConfig(**options))
    if directions is None and config.mode != "none" and config.scale != 0:
        directions = get_directions(loaded, config)
    with apply_steering(loaded, config, directions) as handle:
        yield handle


@dataclass
class SuppressionResult:
    prompt: str
    baseline: str | None
    steered: str
    interventions: dict[str, int]
    config: dict[str, Any]
    model: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def suppress_prompt(prompt: str, model: str | LoadedModel | None = None, mode: str = "auto", scale: float = 1.0,
                    compare: bool = True, system: str | None = None, generation: GenerationConfig | None = None,
                    **options: Any) -> SuppressionResult:
    """Answer one prompt with steering on (and, by default, without it for comparison)."""
    loaded = get_model(model)
    config = SteeringConfig(mode=mode, scale=scale, **options)
    config.notes["scale_given"] = scale != 1.0
    config = resolve_config(loaded, config)
    generation = generation or GenerationConfig(max_tokens=128)
    directions = get_directions(loaded, config) if config.mode != "none" else None
    timings: dict[str, float] = {}
    baseline = None
    if compare:
        started = time.perf_counter()
        baseline = generate(loaded, [prompt], generation, system=system).texts[0]
        timings["baseline"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    with apply_steering(loaded, config, directions) as handle:
        steered = generate(loaded, [prompt], generation, system=system).texts[0]
    timings["steered"] = round(time.perf_counter() - started, 2)
    return SuppressionResult(prompt, baseline, steered, handle.interventions(), config.to_json(), loaded.info.name,
                             timings)


class AlignmentArtifacts:
    """Object-style API that keeps models, directions and analyses across calls."""

    def __init__(self, device: str = "auto", dtype: str = "auto"):
        self.device, self.dtype = device, dtype

    def model(self, name: str | LoadedModel | None = None) -> LoadedModel:
        return get_model(name, self.device, self.dtype)

    def analyze_artifacts(self, model_name: str | LoadedModel | None = None, prompts: str | None = None,
                          site: str = "mlp_out", position: str = "last", progress: bool = True, **kwargs: Any) -> Any:
        from .analysis import analyze

        loaded = self.model(model_name)
        store = collect_activations(loaded, resolve_prompts(prompts), sites=[site], positions=[position],
                                    progress=progress)
        return analyze(store, site=site, position=position, progress=progress, **kwargs)

    def suppress_and_generate(self, prompt: str, model_name: str | None = None, scale: float = 1.0,
                              mode: str = "auto", categories: list[str] | None = None,
                              target_layers: list[int] | None = None, temperature: float = 0.0,
                              max_tokens: int = 128, repetition_penalty: float = 1.0, compare: bool = True,
                              **options: Any) -> SuppressionResult:
        generation = GenerationConfig(max_tokens=max_tokens, temperature=temperature,
                                      repetition_penalty=repetition_penalty, seed=options.pop("seed", None))
        return suppress_prompt(prompt, self.model(model_name), mode=mode, scale=scale, compare=compare,
                               generation=generation, categories=categories, layers=target_layers, **options)

    def steer(self, model: str | LoadedModel | None = None, **options: Any) -> Any:
        return steer(self.model(model), **options)


def check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise UserError("The prompt is empty. Pass the text to send to the model.")
    return prompt

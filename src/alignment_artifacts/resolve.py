"""From what a caller asks for to what runs: stored configurations, ``auto``, and directions.

``resolve_steering`` turns a possibly partial request (mode ``auto``, scale unset) into a
``Steering`` value: the configuration `optimize` stored for these weights or the mode's defaults,
and the directions it reads, collected and computed on first use and cached. Evaluation, optimize,
serve and the API all resolve here; nothing here runs steering.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from .activations import collect_activations
from .analysis.directions import DirectionSet, compute_directions
from .cache import cache_dir, cache_root, stable_hash
from .errors import CacheError, UserError
from .models import LoadedModel
from .prompts import BUILTIN_SETS, PromptSet, resolve_prompts
from .steering import Steering, SteeringConfig


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
    """Turn ``auto`` into the measured best configuration, and fill the mode's defaults.

    ``auto`` takes the stored configuration whole, with the request's scale if it gives one; with
    nothing stored it is ``ablate``. An unset scale becomes the mode's default.
    """
    if config.mode == "auto":
        best = stored_config(loaded)
        if best is not None:
            config = replace(best, scale=best.scale if config.scale is None else config.scale,
                             notes={**best.notes, "auto": "stored optimize result"})
        else:
            config = replace(config, mode="ablate",
                             notes={**config.notes, "auto": "ablate default (no stored optimize result)"})
    config = config.with_default_scale()
    if config.uses_refusal_direction and config.direction_layer is None:
        config = replace(config, direction_layer=default_direction_layer(loaded.adapter.n_layers))
    config.validate(loaded.adapter.n_layers)
    return config


def resolve_steering(loaded: LoadedModel, config: SteeringConfig, directions: DirectionSet | None = None,
                     progress: bool = True, model_lock: contextlib.AbstractContextManager[Any] | None = None
                     ) -> Steering:
    """The ``Steering`` a request means for this model: resolved, with its directions (unless it is a no-op)."""
    config = resolve_config(loaded, config)
    if directions is None and Steering(config).active:
        directions = get_directions(loaded, config, progress=progress, model_lock=model_lock)
    return Steering(config, directions)


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
        if directions.variant != config.direction_variant:
            raise UserError(f"The directions in {stored} are the '{directions.variant}' variant, but this "
                            f"configuration asks for '{config.direction_variant}'. Pass a prompt set as the "
                            "direction source to compute that variant, or drop --direction-variant.")
        return directions
    else:
        _check_source_exists(source)
        prompt_set = resolve_prompts(source)
    key = stable_hash({"weights": loaded.info.weights_hash, "dtype": loaded.info.dtype,
                       "prompts": prompt_set.content_hash(), "site": site, "position": position,
                       "categories": categories, "pca": config.pca_components, **_variant_key(config)})
    folder = cache_dir("directions", key)
    if (folder / "directions.json").is_file():
        return DirectionSet.load(folder)
    store = collect_activations(loaded, prompt_set, sites=[site], positions=[position], progress=progress,
                                model_lock=model_lock)
    directions = compute_directions(store, site, position, categories=categories,
                                    pca_components=max(config.pca_components, 5), variant=config.direction_variant,
                                    benign_components=config.benign_components)
    directions.save(folder)
    return directions


def _variant_key(config: SteeringConfig) -> dict[str, Any]:
    """The cache key's part for a direction variant; none for the default, so existing caches stay valid."""
    if config.direction_variant == "mean_diff":
        return {}
    k = config.benign_components if config.direction_variant == "benign_subspace" else None
    return {"variant": config.direction_variant, "benign_components": k}


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

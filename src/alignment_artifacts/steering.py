"""Steering at inference: every mode as hooks installed by one context manager.

Let v be the raw direction at a layer (difference of means), u = v/|v|, h the hooked
activation and s the scale. Arithmetic runs in float32 and is cast back to the model's dtype.

=========  ===============================================================================
always     h - s*v at every position
proximity  h - s*v only where |cos(h, u)| > proximity_threshold
adaptive   h - s*|cos(h, u)|*v
sphere     h + s*exp(-decay*|h-c|/R) * (h-c)/|h-c| where |h-c| < R (c: sensitive centroid)
subspace   h - s * P^T P (h - m): the top-k PCA subspace of paired differences, centred at m
ablate     h - s*(h.u)u on everything that writes into the residual stream (or chosen sites)
clamp      h - s*max(0, h.u - t)u at each layer's residual input, t between the ordinary and
           the sensitive mean projection (``clamp_level`` 0 and 1): directional ablation that
           leaves activations already on the ordinary side alone, hence a lower KL on ordinary
           prompts at the same refusal rate (conditional, so hooks only: not bakeable)
amplify    h + s*v (induces the artifact, e.g. refusal)
=========  ===============================================================================

Hook bodies are a few fused tensor ops with no host synchronisation; intervention counts
accumulate on the device and are read once, when asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .analysis.directions import DirectionSet
from .errors import UserError, closest
from .models.adapter import SITES
from .models.hooks import site_hooks

MODES = ("none", "always", "proximity", "adaptive", "sphere", "subspace", "ablate", "clamp", "amplify", "auto")
ADDITIVE_MODES = ("always", "amplify")  # a constant vector per layer: exportable as a control vector
LINEAR_MODES = ("ablate",)  # a projection: bakeable into weights
CONFIG_VERSION = 1


@dataclass
class SteeringConfig:
    """Everything that defines a steering intervention; its JSON form is stable across versions."""

    mode: str = "ablate"
    scale: float = 1.0
    layers: list[int] | None = None  # target layers (0-based); None = the mode's default
    site: str | None = None  # hooked site; None = the mode's default
    categories: list[str] | None = None  # directions from these categories only
    proximity_threshold: float = 0.5
    distance_threshold: float = 2.0
    decay_rate: float = 2.0
    pca_components: int = 5
    clamp_level: float = 0.2  # clamp: the cap's place between the ordinary (0) and sensitive (1) means
    direction_layer: int | None = None  # use this layer's direction everywhere (None: each layer its own)
    layer_weights: dict[int, float] | None = None  # per-layer multipliers of the scale (a kernel over layers)
    source: str | None = None  # prompt set the directions come from (None: the mode's default)
    direction_site: str | None = None
    direction_position: str | None = None
    model_id: str = ""
    weights_hash: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def validate(self, n_layers: int | None = None) -> None:
        if self.mode not in MODES:
            raise UserError(f"Unknown mode '{self.mode}'.{closest(self.mode, MODES)} Modes: {', '.join(MODES)}.")
        if not math.isfinite(self.scale):
            raise UserError(f"--scale must be a finite number (got {self.scale}).")
        if self.mode not in ("none", "auto") and self.scale < 0:
            raise UserError(f"--scale must be >= 0 (got {self.scale}); use --mode amplify to add the direction.")
        if not 0 <= self.proximity_threshold <= 1:
            raise UserError(f"--proximity-threshold is a cosine in [0, 1] (got {self.proximity_threshold}).")
        if self.distance_threshold <= 0:
            raise UserError(f"--distance-threshold must be > 0 (got {self.distance_threshold}).")
        if self.decay_rate < 0:
            raise UserError(f"--decay-rate must be >= 0 (got {self.decay_rate}).")
        if not math.isfinite(self.clamp_level) or not -1 <= self.clamp_level <= 2:
            raise UserError(f"--clamp-level is a place between the ordinary (0) and sensitive (1) mean projections; "
                            f"use a value in [-1, 2] (got {self.clamp_level}).")
        if self.pca_components < 1:
            raise UserError(f"--pca-components must be at least 1 (got {self.pca_components}).")
        for name in ("site", "direction_site"):
            value = getattr(self, name)
            if value is not None and value not in SITES:
                raise UserError(f"Unknown site '{value}'.{closest(value, SITES)} Valid sites: {', '.join(SITES)}.")
        if n_layers is not None:
            candidates = list(self.layers or []) + list((self.layer_weights or {}).keys())
            if self.direction_layer is not None:
                candidates.append(self.direction_layer)
            bad = sorted({x for x in candidates if not 0 <= x < n_layers})
            if bad:
                raise UserError(f"Layer(s) {bad} are out of range: this model has {n_layers} decoder blocks, "
                                f"numbered 0 to {n_layers - 1}.")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = CONFIG_VERSION
        if self.layer_weights is not None:
            data["layer_weights"] = {str(k): v for k, v in self.layer_weights.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise UserError(f"Unknown steering configuration field(s): {', '.join(unknown)}. Known: "
                            f"{', '.join(sorted(known))}.")
        values = {k: v for k, v in data.items() if k in known}
        if values.get("layer_weights") is not None:
            values["layer_weights"] = {int(k): float(v) for k, v in values["layer_weights"].items()}
        config = cls(**values)
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        from .cache import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SteeringConfig:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"Could not read the steering configuration {path}: {exc}.") from exc

    # Defaults that depend on the mode -------------------------------------------------------
    @property
    def uses_refusal_direction(self) -> bool:
        return self.mode in ("ablate", "clamp", "amplify")

    def resolved_source(self) -> str:
        return self.source or ("instructions" if self.uses_refusal_direction else "pairs")

    def resolved_direction_site(self) -> str:
        if self.direction_site:
            return self.direction_site
        if self.uses_refusal_direction:
            return "resid_pre"
        return self.site or "mlp_out"

    def resolved_direction_position(self) -> str:
        return self.direction_position or ("first_generated" if self.uses_refusal_direction else "last")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _counted(fn: Callable[[torch.Tensor], tuple[torch.Tensor, Any]], counter: torch.Tensor,
             slot: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a float32 update so it casts back and counts changed positions on-device."""

    def hook(h: torch.Tensor) -> torch.Tensor:
        new, changed = fn(_f32(h))
        counter[slot] += changed
        return new.to(h.dtype)

    return hook


def _mode_fn(config: SteeringConfig, v: torch.Tensor, weight: float, extra: dict[str, torch.Tensor]
             ) -> Callable[[torch.Tensor], tuple[torch.Tensor, Any]]:
    s = float(config.scale) * weight
    u = v / v.norm().clamp_min(1e-12)
    mode = config.mode

    if mode in ("always", "amplify"):
        delta = -s * v if mode == "always" else s * v

        def additive(h: torch.Tensor) -> tuple[torch.Tensor, Any]:
            return h + delta, h.shape[0] * h.shape[1]

        return additive
    if mode == "ablate":
        su = s * u

        def ablate(h: torch.Tensor) -> tuple[torch.Tensor, Any]:
            proj = h @ u
            return h - proj[..., None] * su, h.shape[0] * h.shape[1]

        return ablate
    if mode in ("proximity", "adaptive"):
        threshold = config.proximity_threshold
        sv = s * v

        def conditional(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos = (h @ u) / h.norm(dim=-1).clamp_min(1e-12)
            if mode == "adaptive":
                weight_ = cos.abs()
                return h - weight_[..., None] * sv, (weight_ > 0).sum()
            mask = cos.abs() > threshold
            return h - mask[..., None].to(h.dtype) * sv, mask.sum()

        return conditional
    if mode == "sphere":
        centre, radius, decay = extra["centre"], config.distance_threshold, config.decay_rate

        def sphere(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            d = h - centre
            r = d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            inside = r < radius
            push = inside.to(h.dtype) * s * torch.exp(-decay * r / radius)
            return h + push * d / r, inside.sum()

        return sphere
    if mode == "subspace":
        basis, mean = extra["basis"], extra["mean"]

        def subspace(h: torch.Tensor) -> tuple[torch.Tensor, Any]:
            coords = (h - mean) @ basis.T
            return h - s * (coords @ basis), h.shape[0] * h.shape[1]

        return subspace
    if mode == "clamp":
        cap = extra["threshold"]

        def clamp(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            excess = (h @ u - cap).clamp_min(0)
            return h - (s * excess)[..., None] * u, (excess > 0).sum()

        return clamp
    raise UserError(f"Mode '{mode}' has no hook (use one of {', '.join(MODES[1:-1])}).")


@dataclass
class SteeringHandle:
    """Live view of an active intervention; ``interventions()`` syncs with the device once."""

    config: SteeringConfig
    slots: list[tuple[str, int]]
    counter: torch.Tensor

    def interventions(self) -> dict[str, int]:
        counts = self.counter.tolist()
        per_layer: dict[str, int] = {}
        for (site, layer), count in zip(self.slots, counts):
            per_layer[f"{site}.{layer}"] = per_layer.get(f"{site}.{layer}", 0) + int(count)
        return per_layer

    def total(self) -> int:
        return int(self.counter.sum().item()) if len(self.slots) else 0

    def reset(self) -> None:
        self.counter.zero_()


def hook_targets(config: SteeringConfig, n_layers: int, directions: DirectionSet) -> list[tuple[str, int]]:
    """(site, layer) pairs a configuration hooks."""
    if config.mode == "ablate" and config.site is None:
        layers = config.layers if config.layers is not None else list(range(n_layers))
        targets = [("resid_pre", 0)] if 0 in layers else []  # the embeddings' write
        return targets + [(site, layer) for layer in layers for site in ("attn_out", "mlp_out")]
    own_site = not config.uses_refusal_direction or config.mode == "clamp"  # clamp's caps live at that site
    site = config.site or (directions.site if own_site else "resid_pre")
    if config.layers is not None:
        layers = list(config.layers)
    elif config.mode == "amplify" and config.direction_layer is not None:
        layers = [config.direction_layer]
    elif config.mode == "clamp":
        layers = list(range(n_layers))
    else:
        layers = list(directions.extra.get("recommended_layers") or directions.layers)
    return [(site, layer) for layer in layers]


def _direction_at(directions: DirectionSet, config: SteeringConfig, layer: int) -> int:
    source = config.direction_layer if config.direction_layer is not None else layer
    if source not in directions.vectors:
        raise UserError(f"No direction for layer {source}: directions exist for layers {directions.layers}. Pick "
                        "target layers among those, or recollect with those layers.")
    return source


def _clamp_threshold(directions: DirectionSet, config: SteeringConfig, site: str, layer: int,
                     v: torch.Tensor) -> torch.Tensor:
    """The cap on h.u at a layer, from the two means measured at that very site and layer."""
    if site != directions.site or layer not in directions.negative_mean:
        raise UserError(f"Clamp thresholds come from the directions' mean activations, measured at "
                        f"{directions.site}; hook that site (--site {directions.site}) or collect directions at "
                        f"{site}.")
    u = v / v.norm().clamp_min(1e-12)
    low = directions.negative_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    high = directions.positive_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    return low + config.clamp_level * (high - low)


@contextlib.contextmanager
def apply_steering(loaded: Any, config: SteeringConfig, directions: DirectionSet | None) -> Iterator[SteeringHandle]:
    """Install the configuration's hooks for the block; they are removed on any exit.

    ``mode='none'`` or scale 0 installs nothing, so outputs are bit-identical to the plain model.
    """
    adapter = loaded.adapter
    config.validate(adapter.n_layers)
    if config.mode == "auto":
        raise UserError("Resolve mode 'auto' first (alignment_artifacts.api resolves it from the stored "
                        "`optimize` result).")
    device = loaded.device
    if config.mode == "none" or config.scale == 0:
        yield SteeringHandle(config, [], torch.zeros(0, dtype=torch.long, device=device))
        return
    if directions is None:
        raise UserError(f"Mode '{config.mode}' needs directions; none were given.")
    directions.check_compatible(adapter.hidden_size, loaded.info.weights_hash, loaded.info.name)
    targets = hook_targets(config, adapter.n_layers, directions)
    counter = torch.zeros(len(targets), dtype=torch.long, device=device)
    hooks = {}
    for slot, (site, layer) in enumerate(targets):
        source = _direction_at(directions, config, layer)
        v = directions.vectors[source].to(device=device, dtype=torch.float32)
        extra: dict[str, torch.Tensor] = {}
        if config.mode == "sphere":
            extra["centre"] = directions.positive_mean[source].to(device=device, dtype=torch.float32)
        if config.mode == "subspace":
            if source not in directions.pca:
                raise UserError("Subspace steering needs a PCA basis; recompute directions with pca_components > 0.")
            extra["basis"] = directions.pca[source][: config.pca_components].to(device=device, dtype=torch.float32)
            extra["mean"] = ((directions.positive_mean[source] + directions.negative_mean[source]) / 2).to(
                device=device, dtype=torch.float32)
        if config.mode == "clamp":
            extra["threshold"] = _clamp_threshold(directions, config, site, layer, v)
        weight = 1.0 if config.layer_weights is None else float(config.layer_weights.get(layer, 0.0))
        if weight == 0.0:
            continue
        hooks[(site, layer)] = _counted(_mode_fn(config, v, weight, extra), counter, slot)
    with site_hooks(adapter, hooks):
        yield SteeringHandle(config, targets, counter)

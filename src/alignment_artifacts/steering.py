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

Any mode can be gated per prompt (``gate_layer``, conditional steering): the last prompt token's
projection on the gate layer's own direction, at the directions' site, is compared with a cap
placed like the clamp's (``gate_level`` 0 and 1: the ordinary and sensitive means), and only
prompts above it are steered, at every hooked layer, for the whole answer. Prompts below the gate
are left bit-identical, so they cost no KL. Each prefill through the toolkit's passes first runs
the unmodified model up to the gate layer to decide (batches are left-padded, so the last position
is each prompt's last token); decoding keeps the decision. A direct model call decides mid-pass,
so there only layers from the gate on act. A gated position's treatment depends on later tokens,
so passes under a gate never reuse a prefix computed once for all prompts (``hooks.whole_prompts``).

Hook bodies are a few fused tensor ops with no host synchronisation; intervention counts
accumulate on the device and are read once, when asked for.
"""

from __future__ import annotations

import contextlib
import functools
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
from .models.hooks import decision_passes, site_hooks, whole_prompts
from .models.offload import per_device, site_device

MODES = ("none", "always", "proximity", "adaptive", "sphere", "subspace", "ablate", "clamp", "amplify", "auto")
ADDITIVE_MODES = ("always", "amplify")  # a constant vector per layer: exportable as a control vector
LINEAR_MODES = ("ablate",)  # a projection: bakeable into weights
CONFIG_VERSION = 1
BLOCK_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # the order a block's sites run in


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
    gate_layer: int | None = None  # steer only prompts whose projection here passes gate_level (None: all)
    gate_level: float = 0.0  # the gate's place between the ordinary (0) and sensitive (1) means
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
        if not math.isfinite(self.gate_level) or not -1 <= self.gate_level <= 2:
            raise UserError(f"--gate-level is a place between the ordinary (0) and sensitive (1) mean projections; "
                            f"use a value in [-1, 2] (got {self.gate_level}).")
        if self.pca_components < 1:
            raise UserError(f"--pca-components must be at least 1 (got {self.pca_components}).")
        for name in ("site", "direction_site"):
            value = getattr(self, name)
            if value is not None and value not in SITES:
                raise UserError(f"Unknown site '{value}'.{closest(value, SITES)} Valid sites: {', '.join(SITES)}.")
        if n_layers is not None:
            candidates = list(self.layers or []) + list((self.layer_weights or {}).keys())
            candidates += [x for x in (self.direction_layer, self.gate_layer) if x is not None]
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


class _GateDecided(Exception):
    """Ends a decision pass at the gate layer: the layers above it are not needed."""


class _Gate:
    """Which prompts of the running batch are steered.

    Through the toolkit's own passes (``models.generation.forward``) every prefill first runs the
    unmodified model up to the gate layer, which decides; the real pass then steers the chosen
    prompts at every hooked layer, and decoding keeps the decision. A direct model call has no
    such pass: the gate decides within it, so layers below the gate cannot act on its prompts.
    """

    def __init__(self, layer: int, u: torch.Tensor, cap: torch.Tensor):
        self.layer, self.u, self.cap = layer, u, cap
        self.open: torch.Tensor | None = None
        self.pending = False  # a decision pass has run; its real pass has not reached the gate yet
        self.decided_first = False  # the current decision came from a decision pass
        self.in_decision_pass = False

    def decision_pass(self, run_pass: Callable[[], Any]) -> None:
        self.in_decision_pass = True
        try:
            run_pass()
        except _GateDecided:
            self.pending = self.decided_first = True
        finally:
            self.in_decision_pass = False

    def rows(self, h: torch.Tensor, below_gate: bool) -> torch.Tensor | None:
        """The prompts a hook steers now (None: none); below the gate only with a decision made first."""
        if below_gate and not (self.pending if h.shape[1] > 1 else self.decided_first):
            return None
        if self.in_decision_pass or self.open is None or self.open.shape[0] != h.shape[0]:
            return None
        return self.open

    def _passes(self, h: torch.Tensor) -> torch.Tensor:
        return _f32(h[:, -1]) @ self.u.to(h.device) > self.cap.to(h.device)

    def at_gate(self, h: torch.Tensor) -> None:
        if self.in_decision_pass:
            self.open = self._passes(h)
            raise _GateDecided
        if self.pending and h.shape[1] > 1:  # the real pass of a decision made first: keep it
            self.pending = False
        elif h.shape[1] > 1 or self.open is None or self.open.shape[0] != h.shape[0]:
            self.open, self.decided_first = self._passes(h), False

    def deciding(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], Any]:
        """The gate layer's hook: decide first, then steer (if that site steers at all)."""

        def hook(h: torch.Tensor) -> torch.Tensor | None:
            self.at_gate(h)
            return None if fn is None else fn(h)

        return hook


def _counted(fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], counter: torch.Tensor,
             slot: int, gate: _Gate | None = None, below_gate: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a float32 update so it casts back, keeps gated-out prompts as they were, and counts
    changed positions on-device (``fn`` returns the update and its changed-position mask, None: all)."""

    def hook(h: torch.Tensor) -> torch.Tensor:
        rows = None if gate is None else gate.rows(h, below_gate)
        if gate is not None and rows is None:
            return h
        h32 = _f32(h)
        new, changed = fn(h32)
        if changed is None:
            changed = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if rows is not None:  # decided at the gate layer, which may run on another device
            rows = rows.to(h.device)
            new = torch.where(rows[:, None, None], new, h32)
            changed = changed & rows[:, None]
        counter[slot] += changed.sum().to(counter.device)
        return new.to(h.dtype)

    return hook


def _mode_fn(config: SteeringConfig, v: torch.Tensor, weight: float, extra: dict[str, torch.Tensor]
             ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    s = float(config.scale) * weight
    u = v / v.norm().clamp_min(1e-12)
    mode = config.mode

    if mode in ("always", "amplify"):
        delta = -s * v if mode == "always" else s * v

        def additive(h: torch.Tensor) -> tuple[torch.Tensor, None]:
            return h + delta, None

        return additive
    if mode == "ablate":
        su = s * u

        def ablate(h: torch.Tensor) -> tuple[torch.Tensor, None]:
            proj = h @ u
            return h - proj[..., None] * su, None

        return ablate
    if mode in ("proximity", "adaptive"):
        threshold = config.proximity_threshold
        sv = s * v

        def conditional(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos = (h @ u) / h.norm(dim=-1).clamp_min(1e-12)
            if mode == "adaptive":
                weight_ = cos.abs()
                return h - weight_[..., None] * sv, weight_ > 0
            mask = cos.abs() > threshold
            return h - mask[..., None].to(h.dtype) * sv, mask

        return conditional
    if mode == "sphere":
        centre, radius, decay = extra["centre"], config.distance_threshold, config.decay_rate

        def sphere(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            d = h - centre
            r = d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            inside = r < radius
            push = inside.to(h.dtype) * s * torch.exp(-decay * r / radius)
            return h + push * d / r, inside[..., 0]

        return sphere
    if mode == "subspace":
        basis, mean = extra["basis"], extra["mean"]

        def subspace(h: torch.Tensor) -> tuple[torch.Tensor, None]:
            coords = (h - mean) @ basis.T
            return h - s * (coords @ basis), None

        return subspace
    if mode == "clamp":
        cap = extra["threshold"]

        def clamp(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            excess = (h @ u - cap).clamp_min(0)
            return h - (s * excess)[..., None] * u, excess > 0

        return clamp
    raise UserError(f"Mode '{mode}' has no hook (use one of {', '.join(MODES[1:-1])}).")


def _hook_on(config: SteeringConfig, v: torch.Tensor, weight: float, extra: dict[str, torch.Tensor],
             counter: torch.Tensor, slot: int, gate: _Gate | None, below_gate: bool,
             device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The counted hook of one (site, layer) with its tensors on ``device``."""
    on_device = {name: t.to(device) for name, t in extra.items()}
    return _counted(_mode_fn(config, v.to(device), weight, on_device), counter, slot, gate, below_gate)


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


def _cap(directions: DirectionSet, layer: int, u: torch.Tensor, level: float) -> torch.Tensor:
    """A value of h.u at ``level`` between the ordinary (0) and sensitive (1) means at that layer."""
    low = directions.negative_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    high = directions.positive_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    return low + level * (high - low)


def _clamp_threshold(directions: DirectionSet, config: SteeringConfig, site: str, layer: int,
                     v: torch.Tensor) -> torch.Tensor:
    """The cap on h.u at a layer, from the two means measured at that very site and layer."""
    if site != directions.site or layer not in directions.negative_mean:
        raise UserError(f"Clamp thresholds come from the directions' mean activations, measured at "
                        f"{directions.site}; hook that site (--site {directions.site}) or collect directions at "
                        f"{site}.")
    return _cap(directions, layer, v / v.norm().clamp_min(1e-12), config.clamp_level)


def _gate(directions: DirectionSet, layer: int, level: float, device: torch.device) -> _Gate:
    if layer not in directions.vectors or layer not in directions.negative_mean:
        raise UserError(f"No direction for gate layer {layer}: directions exist for layers {directions.layers}.")
    v = directions.vectors[layer].to(device=device, dtype=torch.float32)
    u = v / v.norm().clamp_min(1e-12)
    return _Gate(layer, u, _cap(directions, layer, u, level))


def gate_passes(directions: DirectionSet, layer: int, level: float, last_token: torch.Tensor) -> torch.Tensor:
    """Which prompts a gate at ``layer`` and ``level`` lets through, from the unmodified model's
    last-token activations there [n, hidden] (what the gate itself compares)."""
    gate = _gate(directions, layer, level, last_token.device)
    return _f32(last_token) @ gate.u > gate.cap


@contextlib.contextmanager
def apply_steering(loaded: Any, config: SteeringConfig, directions: DirectionSet | None,
                   wrap: Callable[[Callable[[torch.Tensor], Any]], Callable[[torch.Tensor], Any]] | None = None
                   ) -> Iterator[SteeringHandle]:
    """Install the configuration's hooks for the block; they are removed on any exit.

    ``mode='none'`` or scale 0 installs nothing, so outputs are bit-identical to the plain model.
    ``wrap``, if given, wraps each site function before it is installed (the server uses it to
    steer only some rows of a batch).
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
    gate = None if config.gate_layer is None else _gate(
        directions, config.gate_layer, config.gate_level, site_device(adapter, directions.site, config.gate_layer))
    # hooks that run before the gate's own site in a pass can only act on a decision made first
    gate_at = (-1, 0) if gate is None else (gate.layer, BLOCK_ORDER.index(directions.site))
    hooks: dict[tuple[str, int], Callable[[torch.Tensor], Any]] = {}
    for slot, (site, layer) in enumerate(targets):
        source = _direction_at(directions, config, layer)
        at = site_device(adapter, site, layer)  # each layer's own device, where accelerate dispatched the model
        v = directions.vectors[source].to(device=at, dtype=torch.float32)
        extra: dict[str, torch.Tensor] = {}
        if config.mode == "sphere":
            extra["centre"] = directions.positive_mean[source].to(device=at, dtype=torch.float32)
        if config.mode == "subspace":
            if source not in directions.pca:
                raise UserError("Subspace steering needs a PCA basis; recompute directions with pca_components > 0.")
            extra["basis"] = directions.pca[source][: config.pca_components].to(device=at, dtype=torch.float32)
            extra["mean"] = ((directions.positive_mean[source] + directions.negative_mean[source]) / 2).to(
                device=at, dtype=torch.float32)
        if config.mode == "clamp":
            extra["threshold"] = _clamp_threshold(directions, config, site, layer, v)
        weight = 1.0 if config.layer_weights is None else float(config.layer_weights.get(layer, 0.0))
        if weight == 0.0:
            continue
        below = (layer, BLOCK_ORDER.index(site)) < gate_at
        hooks[(site, layer)] = per_device(functools.partial(_hook_on, config, v, weight, extra, counter, slot, gate,
                                                            below), at)
    if gate is not None:
        key = (directions.site, gate.layer)
        hooks[key] = gate.deciding(hooks.get(key))
    if wrap is not None:
        hooks = {key: wrap(fn) for key, fn in hooks.items()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(site_hooks(adapter, hooks))
        if gate is not None:
            stack.enter_context(whole_prompts())
            stack.enter_context(decision_passes(gate.decision_pass))
        yield SteeringHandle(config, targets, counter)

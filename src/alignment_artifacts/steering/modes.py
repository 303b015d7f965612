"""The steering modes: one ``ModeSpec`` each in ``MODES``, with the function that builds its hook.

Let v be the raw direction at a layer (difference of means), u = v/|v|, h the hooked
activation and s the scale (times the layer's weight). Arithmetic runs in float32.

=========  ===============================================================================
always     h - s*v at every position
proximity  h - s*v only where |cos(h, u)| > proximity_threshold
adaptive   h - s*|cos(h, u)|*v
sphere     h + s*exp(-decay*|h-c|/R) * (h-c)/|h-c| where |h-c| < R (c: sensitive centroid)
subspace   h - s * P^T P (h - m): the top-k PCA subspace of paired differences, centred at m
ablate     h - s*(h.u)u on everything that writes into the residual stream (or chosen sites)
ablate_norm  ablate, then each position rescaled back to its norm before the ablation
ablate_weight_norm  weights only: each residual writer W' = W - s*u(u^T W), then each column of W'
           (what one input unit writes) rescaled back to its norm in W; no hook reproduces it, so
           ``apply`` edits the weights for its block (no gate, no per-row serving) and export bakes it
ablate_mean  h - s*(h.u - c)u at each layer's residual input: the component set to the ordinary
           (harmless) mean's projection c instead of zero
ablate_read  ablate the inputs of attention and MLP (before their norms), not the residual stream
clamp      h - s*max(0, h.u - t)u at each layer's residual input, t between the ordinary and
           the sensitive mean projection (``clamp_level`` 0 and 1): directional ablation that
           leaves activations already on the ordinary side alone (conditional: not bakeable)
amplify    h + s*v (induces the artifact, e.g. refusal)
=========  ===============================================================================

The table drives the CLI's ``--mode`` choices and per-mode flags, serve's request validation,
``SteeringConfig.validate`` and export's format advice; docs/steering-modes.md shows how to add a mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..analysis.directions import DirectionSet
from ..errors import UserError, closest

if TYPE_CHECKING:
    from .config import SteeringConfig

Update = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # float32 h -> (new h, changed mask)
WeightEdit = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (w, unit u, s) -> new w
WRITERS = "writers"  # pseudo-site: everything that writes into the residual stream (the embeddings, attn, mlp)
READERS = "readers"  # pseudo-site: what attention and the MLP read (their norms' inputs), not the stream


@dataclass(frozen=True)
class Term:
    """One hooked (site, layer): the layer whose direction acts there and its strength s."""

    site: str
    layer: int
    source: int
    s: float


Build = Callable[["SteeringConfig", DirectionSet, Term, torch.device], Update]


@dataclass(frozen=True)
class Param:
    """A mode's knob: a ``SteeringConfig`` field, its default and its allowed range."""

    name: str
    default: float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # value > low (else >=)
    integer: bool = False
    rule: str = ""  # what the error says about the range, e.g. "must be > 0"
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: float) -> None:
        ok = math.isfinite(value) and (self.high is None or value <= self.high)
        if self.low is not None:
            ok = ok and (value > self.low if self.low_open else value >= self.low)
        if not ok:
            raise UserError(f"{self.flag} {self.rule} (got {value}).")


@dataclass(frozen=True)
class ModeSpec:
    """Everything the toolkit knows about one mode; ``build`` is None for ``none`` and ``auto``."""

    name: str
    summary: str
    build: Build | None = None
    params: tuple[Param, ...] = ()
    default_scale: float = 1.0
    refusal_direction: bool = False  # reads the refusal direction (instructions, resid_pre, first generated)
    site: str = "directions"  # default hooked site: "directions" (where they were measured), a site, or WRITERS
    layers: str = "recommended"  # default layers: "recommended", "all", or "direction_layer" (else recommended)
    bake: WeightEdit | None = None  # the edit of each residual writer (float32, hidden units last) export bakes
    additive_sign: float | None = None  # adds sign*s*v everywhere: exportable as a llama.cpp control vector
    conditional: bool = False  # acts depending on each activation: hooks only
    not_bakeable: str = ""  # why a mode that looks like ablation cannot be baked (export's error says it)

    @property
    def control_vector(self) -> bool:
        return self.additive_sign is not None

    @property
    def bakeable(self) -> bool:
        return self.bake is not None

    @property
    def steers(self) -> bool:
        return self.build is not None or self.bake is not None

    @property
    def in_weights(self) -> bool:
        """Defined on weights only: ``apply`` edits the writers for its block instead of installing hooks."""
        return self.build is None and self.bake is not None

    def require_hooks(self, what: str) -> None:
        """Refuse what needs per-prompt hooks (a gate, per-row serving) for a mode that edits the weights."""
        if self.in_weights:
            raise UserError(f"Mode '{self.name}' edits the model's weights for as long as it is applied (every "
                            f"prompt alike), so it cannot {what}. Use mode 'ablate' or 'ablate_norm' (hooks), "
                            "or export --format hf and run the baked model.")


def as_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _v(directions: DirectionSet, term: Term, device: torch.device) -> torch.Tensor:
    return directions.vectors[term.source].to(device=device, dtype=torch.float32)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def mean_projection(directions: DirectionSet, layer: int, u: torch.Tensor, level: float) -> torch.Tensor:
    """A value of h.u at ``level`` between the ordinary (0) and sensitive (1) means at that layer."""
    low = directions.negative_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    high = directions.positive_mean[layer].to(device=u.device, dtype=torch.float32) @ u
    return low + level * (high - low)


def _additive(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    sign = config.spec.additive_sign
    assert sign is not None, config.mode
    delta = sign * term.s * _v(directions, term, device)

    def additive(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return h + delta, None

    return additive


def _ablate(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    u = _unit(_v(directions, term, device))
    su = term.s * u

    def ablate(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        proj = h @ u
        return h - proj[..., None] * su, None

    return ablate


def project_out(w: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """w - s(w.u)u^T: each vector written (rows of ``w``, hidden units last) loses s times its part along u."""
    return w - s * (w @ u)[..., None] * u


def _project_out_keep_norm(w: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """``project_out``, then each vector written rescaled back to its norm before (in weight space)."""
    new = project_out(w, u, s)
    return new * (w.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _ablate_norm(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    ablate = _ablate(config, directions, term, device)

    def ablate_norm(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        new = ablate(h)[0]
        return new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)), None

    return ablate_norm


def _own_means(directions: DirectionSet, term: Term, mode: str) -> None:
    """Modes that read a layer's mean projections need them measured at the hooked site."""
    if term.site != directions.site or term.layer not in directions.negative_mean:
        raise UserError(f"{mode} reads the directions' mean activations, measured at {directions.site}; hook "
                        f"that site (--site {directions.site}) or collect directions at {term.site}.")


def _ablate_mean(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    _own_means(directions, term, "Mean-replacement ablation")
    u = _unit(_v(directions, term, device))
    target, su = mean_projection(directions, term.layer, u, 0.0), term.s * u  # this layer's ordinary mean

    def ablate_mean(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return h - (h @ u - target)[..., None] * su, None

    return ablate_mean


def _proximity(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    v = _v(directions, term, device)
    u, sv, threshold = _unit(v), term.s * v, config.proximity_threshold

    def proximity(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = ((h @ u) / h.norm(dim=-1).clamp_min(1e-12)).abs() > threshold
        return h - mask[..., None].to(h.dtype) * sv, mask

    return proximity


def _adaptive(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    v = _v(directions, term, device)
    u, sv = _unit(v), term.s * v

    def adaptive(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = ((h @ u) / h.norm(dim=-1).clamp_min(1e-12)).abs()
        return h - weight[..., None] * sv, weight > 0

    return adaptive


def _sphere(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    centre = directions.positive_mean[term.source].to(device=device, dtype=torch.float32)
    radius, decay, s = config.distance_threshold, config.decay_rate, term.s

    def sphere(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = h - centre
        r = d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        inside = r < radius
        push = inside.to(h.dtype) * s * torch.exp(-decay * r / radius)
        return h + push * d / r, inside[..., 0]

    return sphere


def _subspace(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    if term.source not in directions.pca:
        raise UserError("Subspace steering needs a PCA basis; recompute directions with pca_components > 0.")
    basis = directions.pca[term.source][: config.pca_components].to(device=device, dtype=torch.float32)
    mean = ((directions.positive_mean[term.source] + directions.negative_mean[term.source]) / 2).to(
        device=device, dtype=torch.float32)
    s = term.s

    def subspace(h: torch.Tensor) -> tuple[torch.Tensor, None]:
        coords = (h - mean) @ basis.T
        return h - s * (coords @ basis), None

    return subspace


def _clamp(config: SteeringConfig, directions: DirectionSet, term: Term, device: torch.device) -> Update:
    _own_means(directions, term, "Clamp")
    u = _unit(_v(directions, term, device))
    cap, s = mean_projection(directions, term.layer, u, config.clamp_level), term.s  # this layer's own means

    def clamp(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        excess = (h @ u - cap).clamp_min(0)
        return h - (s * excess)[..., None] * u, excess > 0

    return clamp


_PLACE = "is a place between the ordinary (0) and sensitive (1) mean projections; use a value in [-1, 2]"

MODES: dict[str, ModeSpec] = {spec.name: spec for spec in (
    ModeSpec("none", "no steering (bit-identical to the plain model)"),
    ModeSpec("always", "h - s*v at every position", _additive, additive_sign=-1.0),
    ModeSpec("proximity", "h - s*v where |cos(h, u)| passes a threshold", _proximity, conditional=True,
             params=(Param("proximity_threshold", 0.5, 0.0, 1.0, rule="is a cosine in [0, 1]",
                           help="|cos| above which proximity acts"),)),
    ModeSpec("adaptive", "h - s*|cos(h, u)|*v", _adaptive, conditional=True),
    ModeSpec("sphere", "a push away from the sensitive centroid, inside a radius", _sphere, conditional=True,
             params=(Param("distance_threshold", 2.0, 0.0, low_open=True, rule="must be > 0", help="sphere radius"),
                     Param("decay_rate", 2.0, 0.0, rule="must be >= 0", help="sphere push decay"))),
    ModeSpec("subspace", "h - s*P^T P (h - m): a PCA subspace of paired differences", _subspace,
             params=(Param("pca_components", 5, 1.0, integer=True, rule="must be at least 1",
                           help="subspace dimension k"),)),
    ModeSpec("ablate", "directional ablation (h - s*(h.u)u) of everything writing the residual stream", _ablate,
             refusal_direction=True, site=WRITERS, bake=project_out),
    ModeSpec("ablate_norm", "ablate, then rescale each position to its norm before", _ablate_norm,
             refusal_direction=True, site=WRITERS,
             not_bakeable="the rescaling factor |h|/|h'| differs per token, and no fixed weights reproduce it"),
    ModeSpec("ablate_weight_norm", "ablate each writer's weights, then rescale each column to its norm (weights "
             "only: no gate or per-row serving)", bake=_project_out_keep_norm, refusal_direction=True, site=WRITERS),
    ModeSpec("ablate_mean", "set h.u to the ordinary mean's projection at each layer's input (not to 0)",
             _ablate_mean, refusal_direction=True, layers="all",
             not_bakeable="it sets the residual stream's own component at each layer, which no single writer's "
                          "weights produce (a bias could carry it only on models whose projections have biases, "
                          "at scale 1, with one direction everywhere)"),
    ModeSpec("ablate_read", "ablate what attention and the MLP read (their norms' inputs), not the stream",
             _ablate, refusal_direction=True, site=READERS,
             not_bakeable="the norm after the ablation rescales each token by its own RMS, so readers' weights "
                          "cannot express it exactly"),
    ModeSpec("clamp", "ablation capped at a level between the ordinary and sensitive means", _clamp,
             refusal_direction=True, layers="all", conditional=True,
             params=(Param("clamp_level", 0.2, -1.0, 2.0, rule=_PLACE,
                           help="cap h.u at this place between the ordinary (0) and sensitive (1) means"),)),
    ModeSpec("amplify", "h + s*v (induces the artifact, e.g. refusal)", _additive, refusal_direction=True,
             site="resid_pre", layers="direction_layer", additive_sign=1.0),
    ModeSpec("auto", "the configuration `optimize` stored, else ablate"),
)}
STEERING_MODES = tuple(name for name, spec in MODES.items() if spec.steers)
PARAMS: dict[str, Param] = {p.name: p for spec in MODES.values() for p in spec.params}
BENIGN_COMPONENTS = Param("benign_components", 3, 1.0, integer=True, rule="must be at least 1",
                          help="principal axes of the ordinary activations the benign_subspace direction removes")
PARAMS[BENIGN_COMPONENTS.name] = BENIGN_COMPONENTS  # a knob of direction computation, for every mode
GATE_LEVEL = Param("gate_level", 0.0, -1.0, 2.0, rule=_PLACE,
                   help="the gate's place between the ordinary (0) and sensitive (1) means")


def mode_spec(name: str) -> ModeSpec:
    if name not in MODES:
        raise UserError(f"Unknown mode '{name}'.{closest(name, list(MODES))} Modes: {', '.join(MODES)}.")
    return MODES[name]


def param_defaults() -> dict[str, Any]:
    return {name: (int(p.default) if p.integer else p.default) for name, p in PARAMS.items()}


def format_advice() -> str:
    """Which export formats each mode can take, from the table."""
    baked = "/".join(f"'{m}'" for m, s in MODES.items() if s.bakeable)
    vector = "/".join(f"'{m}'" for m, s in MODES.items() if s.control_vector)
    return (f"Formats by mode: {baked} -> hf or gguf (weights) or vectors; {vector} -> gguf-control-vector or "
            "vectors; every other mode -> vectors (apply it with alignment_artifacts.export.load_steering + "
            "Steering(config, directions).apply(loaded)).")

"""``Steering``: a resolved configuration and its directions, and what can be done with them.

``apply(loaded)`` installs the hooks for a block (and removes them on any exit; a mode defined on
weights edits the weights instead and restores them on any exit); ``terms`` is the
one place that says which (site, layer) is hooked with which direction at what strength, which
export's baked weights and control vectors read too. Hook bodies are a few fused tensor ops with
no host synchronisation; intervention counts accumulate on the device and are read once, when
asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis.directions import DirectionSet
from ..errors import UserError
from ..models.adapter import READ_SITES
from ..models.hooks import attach_passes, site_hooks
from ..models.offload import per_device, site_device
from .config import SteeringConfig
from .gate import Gate
from .modes import MODES, READERS, WRITERS, ModeSpec, Term, Update, as_f32, format_advice
from .weights import weights_edited

SiteFunction = Callable[[torch.Tensor], Any]
SiteWrap = Callable[[SiteFunction], SiteFunction]


@dataclass
class SteeringHandle:
    """Live view of an active intervention; ``interventions()`` syncs with the device once."""

    config: SteeringConfig
    slots: list[tuple[str, int]]
    counter: torch.Tensor
    allows_prefix_sharing: bool = True  # may passes reuse a prefix computed once for all prompts?

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


def _counted(update: Update, counter: torch.Tensor, slot: int, gate: Gate | None
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a float32 update so it casts back, keeps gated-out prompts as they were, and counts
    changed positions on-device (``update`` returns the new h and its changed-position mask, None: all)."""

    def hook(h: torch.Tensor) -> torch.Tensor:
        rows = None if gate is None else gate.rows(h)
        if gate is not None and rows is None:  # the gate's unmodified decision pass
            return h
        h32 = as_f32(h)
        new, changed = update(h32)
        if changed is None:
            changed = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if rows is not None:  # decided at the gate layer, which may run on another device
            rows = rows.to(h.device)
            new = torch.where(rows[:, None, None], new, h32)
            changed = changed & rows[:, None]
        counter[slot] += changed.sum().to(counter.device)
        return new.to(h.dtype)

    return hook


@dataclass(frozen=True, eq=False)
class Steering:
    """A resolved steering configuration (no ``auto``; scale filled) and the directions it reads."""

    config: SteeringConfig
    directions: DirectionSet | None = None

    def __post_init__(self) -> None:
        if self.config.mode == "auto":
            raise UserError("Resolve mode 'auto' first (alignment_artifacts.resolve.resolve_config resolves it "
                            "from the stored `optimize` result).")
        object.__setattr__(self, "config", self.config.with_default_scale())

    @property
    def spec(self) -> ModeSpec:
        return self.config.spec

    @property
    def scale(self) -> float:
        return float(self.config.scale or 0.0)

    @property
    def active(self) -> bool:
        """Does it change anything? (``none`` and scale 0 install no hooks: bit-identical outputs.)"""
        return self.spec.steers and self.scale != 0

    @property
    def allows_prefix_sharing(self) -> bool:
        """A gate steers a prompt by its last token, so its passes cannot reuse a shared prefix."""
        return not (self.active and self.config.gate_layer is not None)

    def weight_at(self, layer: int) -> float:
        """The layer's multiplier of the scale (``layer_weights``; 1 without them, 0 for layers left out)."""
        weights = self.config.layer_weights
        return 1.0 if weights is None else float(weights.get(layer, 0.0))

    def direction_layer(self, layer: int) -> int:
        """The layer whose direction acts at ``layer``."""
        source = self.config.direction_layer if self.config.direction_layer is not None else layer
        directions = self.require_directions()
        if source not in directions.vectors:
            raise UserError(f"No direction for layer {source}: directions exist for layers {directions.layers}. "
                            "Pick target layers among those, or recollect with those layers.")
        return source

    def targets(self, n_layers: int) -> list[tuple[str, int]]:
        """(site, layer) pairs the configuration hooks."""
        config, spec, directions = self.config, self.spec, self.require_directions()
        site = config.site or (directions.site if spec.site == "directions" else spec.site)
        if site == WRITERS:
            layers = config.layers if config.layers is not None else list(range(n_layers))
            targets = [("resid_pre", 0)] if 0 in layers else []  # the embeddings' write
            return targets + [(s, layer) for layer in layers for s in ("attn_out", "mlp_out")]
        if site == READERS:
            layers = config.layers if config.layers is not None else list(range(n_layers))
            return [(s, layer) for layer in layers for s in READ_SITES]
        if config.layers is not None:
            layers = list(config.layers)
        elif spec.layers == "direction_layer" and config.direction_layer is not None:
            layers = [config.direction_layer]
        elif spec.layers == "all":
            layers = list(range(n_layers))
        else:
            layers = list(directions.extra.get("recommended_layers") or directions.layers)
        return [(site, layer) for layer in layers]

    def terms(self, n_layers: int) -> list[Term]:
        """Every hooked (site, layer) with a non-zero weight: its direction layer and strength s."""
        terms = []
        for site, layer in self.targets(n_layers):
            source = self.direction_layer(layer)
            if self.weight_at(layer) != 0.0:
                terms.append(Term(site, layer, source, self.scale * self.weight_at(layer)))
        return terms

    def bake_terms(self, n_layers: int) -> list[Term]:
        """``terms`` of a configuration that fixed weights can express (else a UserError that says why)."""
        if not self.spec.bakeable:
            baked = "/".join(f"'{m}'" for m, s in MODES.items() if s.bakeable)
            why = (f": {self.spec.not_bakeable}" if self.spec.not_bakeable else
                   f": only {baked} are fixed edits of the weights that write the residual stream")
            raise UserError(f"Mode '{self.config.mode}' cannot be baked into weights{why}. {format_advice()}")
        self._refuse_gate()
        site = self.config.site
        if site in ("resid_pre", "resid_post"):
            raise UserError(f"Ablation at site '{site}' projects the residual stream itself, which no "
                            "single weight matrix produces, so it cannot be baked exactly. Bake the default "
                            "(site unset: every writer into the residual stream) or site attn_out/mlp_out, "
                            "or export --format vectors.")
        return [t for t in self.terms(n_layers) if t.s != 0.0]

    def control_vector(self, n_layers: int) -> list[tuple[Term, torch.Tensor]]:
        """The constant float64 vector each term adds, for additive modes (else a UserError)."""
        if not self.spec.control_vector:
            modes = ", ".join(m for m, s in MODES.items() if s.control_vector)
            raise UserError(f"Mode '{self.config.mode}' is not a constant vector, so it cannot be a llama.cpp "
                            f"control vector (only {modes} are). {format_advice()}")
        self._refuse_gate()
        directions = self.require_directions()
        sign = self.spec.additive_sign
        assert sign is not None
        return [(term, sign * term.s * directions.vectors[term.source].double()) for term in self.terms(n_layers)]

    def _refuse_gate(self) -> None:
        if self.config.gate_layer is not None:
            raise UserError(f"This configuration is gated per prompt (gate_layer {self.config.gate_layer}): "
                            "whether it acts depends on each prompt, which no fixed weights or vectors express. "
                            f"Drop the gate, or keep it with hooks (steer, serve). {format_advice()}")

    def require_directions(self) -> DirectionSet:
        if self.directions is None:
            raise UserError(f"Mode '{self.config.mode}' needs directions; none were given.")
        return self.directions

    @contextlib.contextmanager
    def apply(self, loaded: Any, wrap: SiteWrap | None = None) -> Iterator[SteeringHandle]:
        """Install the hooks for the block; they are removed on any exit (and so is the gate's state).
        A mode defined on weights (``ModeSpec.in_weights``) edits the writers for the block instead, exactly
        as export bakes them, and restores them bit for bit on any exit; its handle counts nothing.

        ``wrap``, if given, wraps each site function before it is installed (the server uses it to
        steer only some rows of a batch).
        """
        adapter, config = loaded.adapter, self.config
        config.validate(adapter.n_layers)
        if not self.active:
            yield SteeringHandle(config, [], torch.zeros(0, dtype=torch.long, device=loaded.device))
            return
        directions = self.require_directions()
        directions.check_compatible(adapter.hidden_size, loaded.info.weights_hash, loaded.info.name)
        if self.spec.in_weights:  # no hooks: the weights themselves, as the baked model has them
            if wrap is not None:
                self.spec.require_hooks("steer only some rows of a batch (as serve does for each request)")
            edit = self.spec.bake
            assert edit is not None
            with weights_edited(adapter, self.bake_terms(adapter.n_layers), directions, edit):
                yield SteeringHandle(config, [], torch.zeros(0, dtype=torch.long, device=loaded.device))
            return
        targets = self.targets(adapter.n_layers)
        counter = torch.zeros(len(targets), dtype=torch.long, device=loaded.device)
        gate = None if config.gate_layer is None else Gate.from_directions(
            directions, config.gate_layer, config.gate_level, site_device(adapter, directions.site, config.gate_layer))
        hooks: dict[tuple[str, int], Callable[[torch.Tensor], Any]] = {}
        build = self.spec.build
        assert build is not None
        slots = {target: slot for slot, target in enumerate(targets)}
        for term in self.terms(adapter.n_layers):
            def make(device: torch.device, term: Term = term) -> Callable[[torch.Tensor], torch.Tensor]:
                return _counted(build(config, directions, term, device), counter, slots[(term.site, term.layer)],
                                gate)

            hooks[(term.site, term.layer)] = per_device(make, site_device(adapter, term.site, term.layer))
        with contextlib.ExitStack() as stack:
            if gate is not None:
                key = (directions.site, gate.layer)
                hooks[key] = gate.deciding_hook(hooks.get(key))
                stack.enter_context(attach_passes(loaded.model, gate))
                stack.enter_context(gate.watching(loaded.model))
            if wrap is not None:
                hooks = {key: wrap(fn) for key, fn in hooks.items()}
            stack.enter_context(site_hooks(adapter, hooks))
            yield SteeringHandle(config, targets, counter, self.allows_prefix_sharing)


def apply_steering(loaded: Any, config: SteeringConfig, directions: DirectionSet | None,
                   wrap: SiteWrap | None = None) -> contextlib.AbstractContextManager[SteeringHandle]:
    """``Steering(config, directions).apply(loaded, wrap)``, for callers that hold the two apart."""
    return Steering(config, directions).apply(loaded, wrap)


"""The per-prompt gate and the pass protocol it follows (docs/steering-modes.md).

A gate steers only the prompts whose last token projects above a cap on the gate layer's own
direction, at the directions' site, for the whole answer. To steer every hooked layer of those
prompts (the layers below the gate too), the decision must exist before the real pass: so each
prefill first runs the unmodified model up to the gate layer (a truncated pass, ended by an
exception there) over the same inputs, and decides per row. Decoding steps keep the decision (of
the rows still running: the runner drops finished rows and says which it kept, ``keep``).
A caller whose rows join and leave a running batch (the server) keeps each row's decision
itself and hands the gate those of the coming pass (``hold``): then no pass decides.

Who says which pass is which: the toolkit's runner (``models.generation.prefill`` and
``decode_step``) states it through ``prefill(run_unmodified)`` and ``decode()``. A direct
``model(...)`` call is stated by a model-level pre-hook (``watching``): a call without a cache, or
with an empty one, is a prefill and runs the same decision from its own inputs; a call that
continues a cache is a decoding step. So both paths give the same result. A gated position's
treatment depends on later tokens, so the gate allows no shared-prefix reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..analysis.directions import DirectionSet
from ..errors import UserError
from .modes import as_f32, mean_projection


class _GateDecided(Exception):
    """Ends a decision pass at the gate layer: the layers above it are not needed."""


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return len(cache)


class Gate:
    """Which prompts of the running batch are steered; implements ``models.hooks.Passes``."""

    allows_prefix_sharing = False

    def __init__(self, layer: int, u: torch.Tensor, cap: torch.Tensor):
        self.layer, self.u, self.cap = layer, u, cap
        self.open: torch.Tensor | None = None  # per row of the running batch: steered or not
        self.phase: str | None = None  # "prefill" or "decode" while a stated pass runs
        self.deciding = False  # inside the truncated unmodified pass
        self.held: torch.Tensor | None = None  # decisions a caller carries for its rows (``hold``)
        self._direct = False  # the current pass was stated by ``watching`` (a direct model call)

    @classmethod
    def from_directions(cls, directions: DirectionSet, layer: int, level: float, device: torch.device) -> Gate:
        if layer not in directions.vectors or layer not in directions.negative_mean:
            raise UserError(f"No direction for gate layer {layer}: directions exist for layers "
                            f"{directions.layers}.")
        v = directions.vectors[layer].to(device=device, dtype=torch.float32)
        u = v / v.norm().clamp_min(1e-12)
        return cls(layer, u, mean_projection(directions, layer, u, level))

    def passes(self, last_token: torch.Tensor) -> torch.Tensor:
        """Per row: does this last-token activation at the gate site pass the cap?"""
        return as_f32(last_token) @ self.u.to(last_token.device) > self.cap.to(last_token.device)

    # The runner's side: state each pass ---------------------------------------------------
    @contextlib.contextmanager
    def prefill(self, run_unmodified: Callable[[], Any]) -> Iterator[None]:
        """A pass that starts prompts: decide from ``run_unmodified`` (the same pass, no cache), then steer."""
        self._begin_prefill(run_unmodified)
        try:
            yield
        finally:
            self.phase = None

    @contextlib.contextmanager
    def decode(self) -> Iterator[None]:
        """A pass that continues the prompts of the last prefill: keep their decision."""
        self._begin_decode()
        try:
            yield
        finally:
            self.phase = None

    def keep(self, rows: torch.Tensor) -> None:
        """Finished rows left the batch: later passes continue ``rows`` (indices into it, in order); held
        decisions shrink with them."""
        if self.open is not None:
            self.open = self.open[rows.to(self.open.device)]
        if self.held is not None:
            self.held = self.held[rows.to(self.held.device)]

    def hold(self, decided: torch.Tensor | None) -> None:
        """From now on every pass keeps ``decided`` (one per row the gate's hooks see, in order: rows
        decided earlier, as the caller kept them) instead of deciding; None: prefills decide again."""
        self.held = decided

    def _begin_prefill(self, run_unmodified: Callable[[], Any]) -> None:
        if self.held is not None:
            self.open, self.phase = self.held, "prefill"
            return
        self.open, self.deciding = None, True
        try:
            run_unmodified()
        except _GateDecided:
            pass
        finally:
            self.deciding = False
        if self.open is None:
            raise RuntimeError(f"The unmodified pass never reached the gate layer {self.layer}.")
        self.phase = "prefill"

    def _begin_decode(self) -> None:
        if self.held is not None:
            self.open = self.held
        if self.open is None:
            raise UserError("A decoding step under a per-prompt gate needs its prompts' prefill first: start "
                            "the prompts with a pass that has no cache (or an empty one).")
        self.phase = "decode"

    # The hooks' side ------------------------------------------------------------------------
    def at_gate(self, h: torch.Tensor) -> None:
        """The gate layer's site: in the decision pass, decide and end it."""
        if self.deciding:
            self.open = self.passes(h[:, -1])
            raise _GateDecided

    def rows(self, h: torch.Tensor) -> torch.Tensor | None:
        """The rows a hook steers now; None inside the decision pass (which runs unmodified)."""
        if self.deciding:
            return None
        if self.phase is None or self.open is None:
            raise UserError("A gated steering hook ran outside a model call (a decoder block called on its own?); "
                            "call the whole model, whose passes the gate decides on.")
        if self.open.shape[0] != h.shape[0]:
            raise UserError(f"The gate decided for a batch of {self.open.shape[0]} prompts, but this pass has "
                            f"{h.shape[0]} rows; decode the same batch the prefill started.")
        return self.open

    def deciding_hook(self, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], Any]:
        """The gate layer's hook: decide (in the decision pass), then steer (if that site steers at all)."""

        def hook(h: torch.Tensor) -> torch.Tensor | None:
            self.at_gate(h)
            return None if fn is None else fn(h)

        return hook

    # Direct model calls ---------------------------------------------------------------------
    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator[None]:
        """State the passes of direct ``model(...)`` calls, so they decide exactly as the runner's do."""

        def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.phase is not None or self.deciding:  # stated by the runner, or the decision pass itself
                return
            if _cache_length(kwargs.get("past_key_values", kwargs.get("cache"))) > 0:
                self._begin_decode()
            else:
                plain = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
                self._begin_prefill(lambda: module(*args, **{**plain, "use_cache": False}))
            self._direct = True

        def after(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._direct and not self.deciding:
                self._direct, self.phase = False, None

        handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                   model.register_forward_hook(after, with_kwargs=True, always_call=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._direct, self.phase, self.deciding = False, None, False


def gate_places(directions: DirectionSet, layer: int, last_token: torch.Tensor) -> torch.Tensor:
    """Each prompt's place on a gate's scale at ``layer`` (0 the ordinary mean, 1 the sensitive mean), from
    the unmodified model's last-token activations there [n, hidden]: a gate at ``level`` lets through the
    prompts placed above it."""
    gate = Gate.from_directions(directions, layer, 0.0, last_token.device)
    one = mean_projection(directions, layer, gate.u, 1.0)
    return (as_f32(last_token) @ gate.u - gate.cap) / (one - gate.cap)


def gate_passes(directions: DirectionSet, layer: int, level: float, last_token: torch.Tensor) -> torch.Tensor:
    """Which prompts a gate at ``layer`` and ``level`` lets through, from the unmodified model's
    last-token activations there [n, hidden] (what the gate itself compares)."""
    return Gate.from_directions(directions, layer, level, last_token.device).passes(last_token)

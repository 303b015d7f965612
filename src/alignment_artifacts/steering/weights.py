"""Editing the residual writers' weights with a mode's ``bake`` edit: on export's copy, or for a block.

Export bakes a copy (``edit_writers``); a mode defined on weights only (``ModeSpec.in_weights``)
runs by editing the loaded model itself for the block (``weights_edited``), so what ``apply``
computes is what the baked model computes, and the originals come back bit for bit on any exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..analysis.directions import DirectionSet
from ..errors import UserError
from ..models.adapter import ModelAdapter, Writer
from ..models.offload import editable
from .modes import Term, WeightEdit


def write_direction(adapter: ModelAdapter, site: str, layer: int, u: torch.Tensor) -> torch.Tensor:
    """The unit direction to remove from the writers at (site, layer): u itself, or g*u normalised where a
    post-projection norm with gain g sits before the residual stream (no u then reaches it, at scale 1)."""
    gain = adapter.write_gain(site, layer)
    if gain is None:
        return u
    v = gain.to(u.device) * u.float()
    return v / v.norm().clamp_min(1e-12)


def check_real_valued(adapter: ModelAdapter, plan: list[Term]) -> None:
    """Refuse quantized writers before anything is copied or edited."""
    for term in plan:
        for writer in adapter.writers(term.site, term.layer):
            if not writer.tensor.dtype.is_floating_point:
                raise UserError(f"{writer.name} holds quantized weights ({writer.tensor.dtype}); editing them "
                                "needs real-valued weights. Load the model without --quantization (float16, "
                                "bfloat16 or float32) and try again.")


@torch.no_grad()
def edit_writer(writer: Writer, u: torch.Tensor, s: float, edit: WeightEdit) -> None:
    """Replace ``writer`` in place by ``edit`` of it (float32 maths, hidden units last, one expert's matrix
    at a time for stacked experts; a bias is the one vector a constant input writes)."""
    t = writer.tensor
    slices = [t[i] for i in range(t.shape[0])] if t.dim() == 3 else [t]
    axis = writer.axis - 1 if t.dim() == 3 else writer.axis
    u = u.to(device=t.device, dtype=torch.float32)
    for part in slices:
        w = part.float().movedim(axis, -1)
        part.copy_(edit(w, u, s).movedim(-1, axis).to(part.dtype))


def tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def edit_writers(adapter: ModelAdapter, plan: list[Term], directions: DirectionSet, edit: WeightEdit,
                 originals: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Apply ``edit`` to every writer of every term of ``plan`` in ``adapter``'s model; returns the names
    changed. ``originals``, if given, receives a copy of each tensor just before it is edited."""
    model, changed = adapter.model, []
    for term in plan:
        u = write_direction(adapter, term.site, term.layer, directions.unit(term.source))
        for name in [writer.name for writer in adapter.writers(term.site, term.layer)]:
            module = model.get_submodule(name.rpartition(".")[0])
            with editable(module):  # an offloaded weight is edited where accelerate loads it from
                writer = next(w for w in adapter.writers(term.site, term.layer) if w.name == name)
                if originals is not None:
                    originals[name] = writer.tensor.detach().clone()
                edit_writer(writer, u, term.s, edit)
            changed.append(name)
    return changed


@torch.no_grad()
def _restore(model: Any, originals: dict[str, torch.Tensor]) -> None:
    for name, original in originals.items():
        with editable(model.get_submodule(name.rpartition(".")[0])):
            model.get_parameter(name).copy_(original)


@contextlib.contextmanager
def _own_head(model: Any) -> Iterator[None]:
    """A tied LM head gets its own copy of the weights for the block, so editing the embeddings leaves
    it as it was (as the baked copy, whose head is untied); it shares the embeddings again on exit."""
    head = model.get_output_embeddings()
    shared = head.weight
    head.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        head.weight = shared


@contextlib.contextmanager
def weights_edited(adapter: ModelAdapter, plan: list[Term], directions: DirectionSet, edit: WeightEdit
                   ) -> Iterator[list[str]]:
    """The model's writers edited for the block, restored bit for bit on any exit (also a failed edit)."""
    check_real_valued(adapter, plan)
    model = adapter.model
    originals: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        if any(term.site == "resid_pre" for term in plan) and tied(model):
            stack.enter_context(_own_head(model))
        stack.callback(_restore, model, originals)
        yield edit_writers(adapter, plan, directions, edit, originals)

"""Directional ablation baked into a copy of the weights, for the ``hf`` and ``gguf`` exports.

Every matrix that writes into the residual stream at a hooked site is orthogonalised against the
direction, so the plain model reproduces ``mode='ablate'`` with no hooks. ``bake_error`` measures
how far the copy is from the hooked model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .models.adapter import ModelAdapter, Writer
from .models.offload import editable, execution_device
from .steering import Steering, Term


def bake_plan(steering: Steering, adapter: ModelAdapter) -> list[Term]:
    """Every hook that ablation would install, if fixed weights can express them (else a UserError)."""
    terms = steering.bake_terms(adapter.n_layers)
    site = steering.config.site
    if site in ("resid_pre", "resid_post"):
        raise UserError(f"Ablation at site '{site}' projects the residual stream itself, which no "
                        "single weight matrix produces, so it cannot be baked exactly. Bake the default "
                        "(site unset: every writer into the residual stream) or site attn_out/mlp_out, "
                        "or export --format vectors.")
    return terms


@torch.no_grad()
def _orthogonalise(writer: Writer, u: torch.Tensor, s: float) -> None:
    """Make what ``writer`` adds lose ``s`` times its component along unit ``u`` (in place, float32 maths,
    one expert's matrix at a time for stacked experts)."""
    t = writer.tensor
    slices = [t[i] for i in range(t.shape[0])] if t.dim() == 3 else [t]
    axis = writer.axis - 1 if t.dim() == 3 else writer.axis
    u = u.to(device=t.device, dtype=torch.float32)
    for part in slices:
        w = part.float().movedim(axis, -1)  # hidden units last: w - s (w.u) u^T
        part.copy_((w - s * (w @ u)[..., None] * u).movedim(-1, axis).to(part.dtype))


def write_direction(adapter: ModelAdapter, site: str, layer: int, u: torch.Tensor) -> torch.Tensor:
    """The unit direction to remove from the writers at (site, layer): u itself, or g*u normalised where a
    post-projection norm with gain g sits before the residual stream (no u then reaches it, at scale 1)."""
    gain = adapter.write_gain(site, layer)
    if gain is None:
        return u
    v = gain.to(u.device) * u.float()
    return v / v.norm().clamp_min(1e-12)


def _tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _untie(model: Any) -> None:
    """Give the LM head its own copy of the weights so editing the embeddings leaves the head intact."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False


def _clear_quantization(model: Any) -> None:
    """Drop quantizer state so save_pretrained writes (and from_pretrained reads) plain tensors."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def bake_ablation(loaded: Any, steering: Steering) -> tuple[Any, list[str]]:
    """A deep copy of the model with the ablation baked in, and the names of the matrices changed."""
    adapter: ModelAdapter = loaded.adapter
    plan = bake_plan(steering, adapter)
    directions = steering.require_directions()
    for term in plan:  # refuse quantized weights before copying the model
        for writer in adapter.writers(term.site, term.layer):
            if not writer.tensor.dtype.is_floating_point:
                raise UserError(f"{writer.name} holds quantized weights ({writer.tensor.dtype}); baking needs "
                                "real-valued weights. Load the model without --quantization (float16, "
                                "bfloat16 or float32) and export again.")
    model = copy.deepcopy(loaded.model)
    copied = ModelAdapter(model)
    if any(term.site == "resid_pre" for term in plan) and _tied(model):
        _untie(model)
    changed = []
    for site, layer, source, s in ((t.site, t.layer, t.source, t.s) for t in plan):
        u = write_direction(copied, site, layer, directions.unit(source))
        for name in [writer.name for writer in copied.writers(site, layer)]:
            # an offloaded weight is edited where accelerate loads it from, so look it up inside the block
            with editable(model.get_submodule(name.rpartition(".")[0])):
                _orthogonalise(next(w for w in copied.writers(site, layer) if w.name == name), u, s)
            changed.append(name)
    _clear_quantization(model)
    return model, changed


@torch.no_grad()
def bake_error(loaded: Any, baked: Any, steering: Steering, text: str = "Explain how locks and keys work."
               ) -> dict[str, float]:
    """Max |logit difference| between the hooked model and the baked copy, absolute and relative."""
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    with steering.apply(loaded):
        hooked = loaded.model(input_ids=ids).logits.float()
    baked_logits = baked(input_ids=ids.to(execution_device(baked.get_input_embeddings()))).logits.float()
    diff = (hooked - baked_logits.to(hooked.device)).abs().max().item()
    return {"max_abs_logit_diff": diff, "relative": diff / max(hooked.abs().max().item(), 1e-12)}

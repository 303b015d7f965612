"""Directional ablation baked into a copy of the weights, for the ``hf`` and ``gguf`` exports.

Every matrix that writes into the residual stream at a hooked site gets the mode's weight edit
(``ModeSpec.bake``; for ``ablate`` orthogonalised against the direction), so the plain model
reproduces the mode with no hooks. ``bake_error`` measures how far the copy is from the applied
mode.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .models.adapter import ModelAdapter
from .models.offload import execution_device
from .steering import Steering, Term
from .steering.weights import check_real_valued, edit_writers, tied


def bake_plan(steering: Steering, adapter: ModelAdapter) -> list[Term]:
    """Every (site, layer) whose writers the bake edits, if fixed weights can express them (else a UserError)."""
    return steering.bake_terms(adapter.n_layers)


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
    """A deep copy of the model with the mode's weight edit baked in, and the names of the matrices changed."""
    adapter: ModelAdapter = loaded.adapter
    plan = bake_plan(steering, adapter)
    edit = steering.spec.bake
    assert edit is not None, steering.config.mode
    check_real_valued(adapter, plan)  # before copying the model
    model = copy.deepcopy(loaded.model)
    if any(term.site == "resid_pre" for term in plan) and tied(model):
        _untie(model)
    changed = edit_writers(ModelAdapter(model), plan, steering.require_directions(), edit)
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

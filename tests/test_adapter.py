"""Every family's sites, resolved through the adapter, match the model's own hidden states."""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.models import SITES, site_hooks
from alignment_artifacts.models.adapter import spec_for
from tiny_models import FAMILIES, tiny_model


def _capture(loaded, ids, mask):
    captured = {}

    def keep(site, layer):
        def fn(h):
            captured[(site, layer)] = h.detach().clone()

        return fn

    hooks = {(s, layer): keep(s, layer) for s in SITES for layer in range(loaded.adapter.n_layers)}
    with site_hooks(loaded.adapter, hooks):
        out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return captured, out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_hidden_states(family):
    loaded = tiny_model(family)
    tok = loaded.tokenizer
    batch = tok(["Explain how locks work.", "Hello"], return_tensors="pt", padding=True)
    captured, hidden = _capture(loaded, batch["input_ids"], batch["attention_mask"])
    n = loaded.adapter.n_layers
    assert len(hidden) == n + 1
    for layer in range(n):
        assert torch.equal(captured[("resid_pre", layer)], hidden[layer]), (family, layer)
        if layer < n - 1:  # the last entry of hidden_states is after the final norm
            assert torch.equal(captured[("resid_post", layer)], hidden[layer + 1]), (family, layer)
        delta = captured[("resid_post", layer)] - captured[("resid_pre", layer)]
        parts = captured[("attn_out", layer)] + captured[("mlp_out", layer)]
        torch.testing.assert_close(parts, delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_writers_and_projections_resolve(family):
    loaded = tiny_model(family, layers=2)
    adapter = loaded.adapter
    names = [name for name, _ in adapter.residual_writers()]
    assert len(names) == len(adapter.spec.embeddings) + 2 * adapter.n_layers
    for layer in range(adapter.n_layers):
        for proj in adapter.output_projections(layer):
            assert hasattr(proj, "weight")
    assert adapter.hidden_size == 64


def test_hooks_removed_after_exception():
    loaded = tiny_model("llama", layers=2)
    ids = loaded.tokenizer(["Hello world"], return_tensors="pt")["input_ids"]
    before = loaded.model(input_ids=ids).logits

    def boom(h):
        return h * 0

    with pytest.raises(RuntimeError), site_hooks(loaded.adapter, {("resid_post", 0): boom}):
        raise RuntimeError("inside")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())
    assert torch.equal(loaded.model(input_ids=ids).logits, before)


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UserError) as err:
        spec_for("mamba")
    assert "llama" in str(err.value) and "ARCHITECTURES" in str(err.value)


def test_out_of_range_layer():
    loaded = tiny_model("llama", layers=2)
    with pytest.raises(UserError, match="numbered 0 to 1"):
        loaded.adapter.site_module("mlp_out", 5)

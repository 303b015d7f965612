"""Every family's sites, resolved through the adapter, match the model's own hidden states."""

from __future__ import annotations

import json

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.models import SITES, site_hooks
from alignment_artifacts.models.adapter import spec_for
from tiny_models import FAMILIES, MOE_FAMILIES, tiny_model


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
def test_writers_are_the_models_own_parameters(family):
    loaded = tiny_model(family, layers=2)
    adapter = loaded.adapter
    params = dict(loaded.model.named_parameters())
    writers = list(adapter.residual_writers())
    for writer in writers:  # named as the model names them, with the hidden units on the stated axis
        assert params[writer.name] is writer.tensor, writer.name
        assert writer.tensor.shape[writer.axis] == adapter.hidden_size == 64, writer.name
    assert len({w.name for w in writers}) == len(writers)
    for layer in range(adapter.n_layers):
        assert adapter.writers("attn_out", layer) and adapter.writers("mlp_out", layer)
    stacked = [w.name for w in writers if w.tensor.dim() == 3]
    assert bool(stacked) == (family in MOE_FAMILIES)


def test_granite_sites_are_the_scaled_contributions():
    """Granite scales attention and MLP outputs by residual_multiplier before the add: a vector added at
    mlp_out must reach the residual stream as is, exactly like one added after the block."""
    loaded = tiny_model("granite", layers=2)
    assert loaded.adapter.site_scale("mlp_out") == 0.3 and loaded.adapter.site_scale("resid_post") == 1.0
    ids = loaded.tokenizer(["Explain how locks work."], return_tensors="pt")["input_ids"]
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    results = []
    for site in ("mlp_out", "resid_post"):
        with site_hooks(loaded.adapter, {(site, 0): lambda h: h + v}):
            results.append(loaded.model(input_ids=ids).logits)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results[0], loaded.model(input_ids=ids).logits, atol=1e-3)


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


def test_models_families_lists_dense_moe_and_unsupported(capsys):
    from alignment_artifacts import cli

    assert cli.main(["models", "--families", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["model_type"]: r for r in data["families"]}
    assert set(FAMILIES) <= set(rows)
    assert rows["mixtral"]["kind"] == "moe" and "down_proj" in rows["mixtral"]["experts"]
    assert rows["llama"]["kind"] == "dense" and rows["llama"]["bake"] == "exact"
    assert rows["olmo2"]["bake"].startswith("approximate")
    assert any("trust_remote_code" in m["why"] for m in data["not_supported"])
    assert cli.main(["models", "--families"]) == 0
    assert "gpt_oss" in capsys.readouterr().out

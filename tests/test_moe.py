"""Mixture-of-experts: every steering mode and collection run through the sparse blocks, baking
reaches every expert (fused or listed), and a layout the adapter table does not know is refused."""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts import activations as act
from alignment_artifacts.errors import UserError
from alignment_artifacts.export import bake_ablation
from alignment_artifacts.models import site_hooks, wrap_model
from alignment_artifacts.steering import MODES, Steering, SteeringConfig, apply_steering
from test_activations import make_set
from test_export import hooked_logits, one_thread, real_logits, relative_error  # noqa: F401 (fixture)
from tiny_models import MOE_FAMILIES, tiny_model, unfuse_experts
from tiny_steering import STEER_MODES, logits, random_directions


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_mode_steers_and_leaves_no_trace(family):
    loaded = tiny_model(family, layers=3)
    directions = random_directions(loaded)
    for means in (directions.positive_mean, directions.negative_mean):  # clamp caps near 0: some positions pass
        means.update({layer: 0.01 * mean for layer, mean in means.items()})
    plain = logits(loaded)
    for mode in STEER_MODES:
        with apply_steering(loaded, SteeringConfig(mode=mode, scale=0.0), directions):
            assert torch.equal(logits(loaded), plain), mode
        config = SteeringConfig(mode=mode, scale=2.0, distance_threshold=50.0, proximity_threshold=0.0,
                                site="mlp_out" if mode != "ablate" else None)
        with apply_steering(loaded, config, directions) as handle:
            steered = logits(loaded)
        assert (handle.total() > 0 or MODES[mode].in_weights) and not torch.equal(steered, plain), mode
        assert torch.equal(logits(loaded), plain), mode


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ablation_leaves_the_sparse_block_output_orthogonal(family):
    loaded = tiny_model(family, layers=3)
    directions = random_directions(loaded)
    u, seen = directions.unit(1), {}

    def keep(layer):
        return lambda h: seen.__setitem__(layer, h @ u)

    observers = {("mlp_out", layer): keep(layer) for layer in range(3)}
    with apply_steering(loaded, SteeringConfig(mode="ablate", direction_layer=1), directions), \
            site_hooks(loaded.adapter, observers):
        logits(loaded)
    assert all(seen[layer].abs().max() < 1e-4 for layer in range(3))
    with site_hooks(loaded.adapter, observers):
        logits(loaded)
    assert all(seen[layer].abs().max() > 1e-2 for layer in range(3))  # the unsteered blocks do write along u


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_collection_through_sparse_blocks(family, cache_root):
    loaded = tiny_model(family, layers=2)
    store = act.collect_activations(loaded, make_set(6), sites="resid_pre,resid_post,attn_out,mlp_out",
                                    positions="last", dtype="float32", batch_size=3, progress=False)
    for layer in range(2):
        attn, mlp, pre, post = (store.get(site, layer, "last") for site in ("attn_out", "mlp_out", "resid_pre",
                                                                             "resid_post"))
        assert mlp.shape == (6, 64) and mlp.abs().max() > 0
        torch.testing.assert_close(attn + mlp, post - pre, rtol=1e-4, atol=1e-5)


def test_expert_list_layout_resolves_and_bakes():
    fused = tiny_model("qwen2_moe")
    expected = real_logits(fused.model, fused.tokenizer)
    loaded = unfuse_experts(fused)
    torch.testing.assert_close(real_logits(loaded.model, loaded.tokenizer), expected, rtol=1e-5, atol=1e-5)
    names = [w.name for w in loaded.adapter.writers("mlp_out", 0)]
    assert names == [*(f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)),
                     "model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert [w.name for w in loaded.adapter.writers("mlp_out", 1)] == ["model.layers.1.mlp.down_proj.weight"]
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate", direction_layer=2)
    baked, changed = bake_ablation(loaded, Steering(config, directions))
    assert set(names) <= set(changed)
    assert relative_error(real_logits(baked, loaded.tokenizer), hooked_logits(loaded, config, directions)) < 1e-4


def _refused(model, tokenizer) -> str:
    with pytest.raises(UserError) as err:
        wrap_model(model, tokenizer)
    return str(err.value)


def test_unknown_expert_layouts_are_refused_with_the_names_found():
    loaded = tiny_model("mixtral", layers=2)
    mlp = loaded.model.model.layers[1].mlp
    mlp.expert_bank = mlp.experts  # a renamed experts module
    del mlp.experts
    message = _refused(loaded.model, loaded.tokenizer)
    assert "model.layers.1" in message and "mlp.experts.down_proj" in message
    assert "mlp.expert_bank.down_proj [4, 64, 128]" in message and "mlp.gate.weight [4, 64]" in message

    loaded = tiny_model("olmoe", layers=2)
    experts = loaded.model.model.layers[0].mlp.experts  # [experts, inter, hidden] where the row says hidden, inter
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())
    message = _refused(loaded.model, loaded.tokenizer)
    assert "[experts, hidden, inter]" in message and "mlp.experts.down_proj [4, 128, 64]" in message


@pytest.mark.parametrize("family, part", [("qwen2_moe", "shared_expert"), ("gpt_oss", "down_proj_bias")])
def test_a_missing_shared_expert_or_bias_is_refused(family, part):
    loaded = tiny_model(family, layers=2)
    mlp = loaded.model.model.layers[0].mlp
    holder = mlp if part == "shared_expert" else mlp.experts
    delattr(holder, part)
    message = _refused(loaded.model, loaded.tokenizer)
    assert part in message and "mlp.experts.down_proj" in message

"""Steering modes on tiny random models: exactness invariants and mode semantics."""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.models import GenerationConfig, generate, site_hooks
from alignment_artifacts.models.generation import encode_batch, format_chat
from alignment_artifacts.steering import MODES, SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import PROMPTS, STEER_MODES, logits, random_directions


@pytest.mark.parametrize("mode", STEER_MODES)
def test_scale_zero_and_exit_are_exact(mode):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    plain = logits(loaded)
    with apply_steering(loaded, SteeringConfig(mode=mode, scale=0.0), directions):
        assert torch.equal(logits(loaded), plain)
    with apply_steering(loaded, SteeringConfig(mode=mode, scale=2.0, distance_threshold=50.0,
                                               proximity_threshold=0.0), directions) as handle:
        steered = logits(loaded)
    assert not torch.equal(steered, plain), mode
    assert handle.total() > 0 or MODES[mode].in_weights  # a mode that edits weights installs no counting hooks
    assert torch.equal(logits(loaded), plain)


def test_mode_none_is_exact():
    loaded = tiny_model("qwen2")
    plain = logits(loaded)
    with apply_steering(loaded, SteeringConfig(mode="none"), None):
        assert torch.equal(logits(loaded), plain)


@pytest.mark.parametrize("mode", ["ablate", "always", "adaptive", "amplify"])
def test_batched_equals_single(mode):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    config = GenerationConfig(max_tokens=8)
    with apply_steering(loaded, SteeringConfig(mode=mode, scale=0.5, layers=[1, 2]), directions):
        batched = generate(loaded, PROMPTS, config, batch_size=4).tokens
        single = [generate(loaded, [p], config).tokens[0] for p in PROMPTS]
    assert batched == single


def test_ablate_leaves_sites_orthogonal():
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    seen = {}

    def keep(key):
        def fn(h):
            seen[key] = h.detach().clone()

        return fn

    with apply_steering(loaded, SteeringConfig(mode="ablate", scale=1.0, direction_layer=2), directions):
        # observers registered after the steering hooks see the steered outputs
        observers = {(site, layer): keep((site, layer)) for layer in range(4) for site in ("attn_out", "mlp_out")}
        with site_hooks(loaded.adapter, observers):
            logits(loaded)
            u = directions.unit(2)
            for layer in range(4):
                for site in ("attn_out", "mlp_out"):
                    proj = seen[(site, layer)] @ u
                    assert proj.abs().max() < 1e-4, (site, layer)


def test_hooks_cleaned_after_exception_in_generation():
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    plain = logits(loaded)

    def explode(_token):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), apply_steering(loaded, SteeringConfig(mode="ablate"), directions):
        from alignment_artifacts.models.generation import generate_ids

        texts = [format_chat(loaded.tokenizer, "Hello")]
        ids, mask = encode_batch(loaded.tokenizer, texts, "cpu")
        generate_ids(loaded.model, ids, mask, GenerationConfig(max_tokens=4), on_step=explode)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())
    assert torch.equal(logits(loaded), plain)


def test_hooks_active_during_decoding_steps():
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    with apply_steering(loaded, SteeringConfig(mode="always", scale=1.0, layers=[1]), directions) as handle:
        out = generate(loaded, ["Hello"], GenerationConfig(max_tokens=5, ignore_end_tokens=True))
    prompt_len = out.prompt_lengths[0]
    # prefill counts every prompt position, then one position per decoding step
    assert handle.total() == prompt_len + 4


def test_bad_configs():
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    with pytest.raises(UserError, match="Modes"):
        SteeringConfig(mode="ablatee").validate()
    with pytest.raises(UserError, match="out of range"), apply_steering(
            loaded, SteeringConfig(mode="always", layers=[9]), directions):
        pass
    with pytest.raises(UserError, match="proximity"):
        SteeringConfig(mode="proximity", proximity_threshold=1.5).validate()
    other = random_directions(loaded)
    other.hidden_size = 128
    with pytest.raises(UserError, match="hidden size"), apply_steering(loaded, SteeringConfig(mode="always"), other):
        pass
    other = random_directions(loaded)
    other.weights_hash = "0123456789abcdef"
    with pytest.raises(UserError, match="Directions do not transfer"), apply_steering(
            loaded, SteeringConfig(mode="always"), other):
        pass


def test_config_json_roundtrip():
    config = SteeringConfig(mode="ablate", scale=0.8, layers=[1, 2], layer_weights={1: 0.5, 2: 1.0},
                            direction_layer=3)
    again = SteeringConfig.from_json(config.to_json())
    assert again == config
    with pytest.raises(UserError, match="Unknown steering configuration"):
        SteeringConfig.from_json({"mode": "ablate", "bogus": 1})


def test_shared_prefix_logits_match_plain_forward():
    from alignment_artifacts.models.generation import next_token_logits

    loaded = tiny_model("llama")
    texts = [format_chat(loaded.tokenizer, p, system="You are a helpful assistant who answers well.")
             for p in PROMPTS]
    positions = []  # what the model is fed: the shared prefix once, then only each prompt's own tokens
    with site_hooks(loaded.adapter, {("resid_pre", 0): lambda h: positions.append(h.shape[0] * h.shape[1])}):
        shared = next_token_logits(loaded.model, loaded.tokenizer, texts, batch_size=3, min_shared=4)
        fed_shared = sum(positions)
        positions.clear()
        plain = next_token_logits(loaded.model, loaded.tokenizer, texts, batch_size=3, min_shared=10_000)
        fed_plain = sum(positions)
    assert fed_shared < fed_plain  # the prefix was really shared
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)
    single = torch.cat([loaded.model(input_ids=loaded.tokenizer(t, add_special_tokens=False, return_tensors="pt")
                                     ["input_ids"]).logits[:, -1] for t in texts])  # one unpadded prompt at a time
    torch.testing.assert_close(plain, single, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared, single, rtol=1e-4, atol=1e-4)


def test_clamp_caps_projection_and_leaves_lower_positions_alone():
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    directions.site = "resid_pre"
    config = SteeringConfig(mode="clamp", scale=1.0, direction_layer=1, clamp_level=0.5)
    u = directions.unit(1)
    caps = {layer: float(directions.negative_mean[layer] @ u
                         + 0.5 * (directions.positive_mean[layer] - directions.negative_mean[layer]) @ u)
            for layer in range(4)}
    before, after = {}, {}

    def keep(store, key):
        def fn(h):
            store[key] = h.detach().clone()

        return fn

    # an observer installed first sees the input before the clamp; one installed inside sees it after
    with (site_hooks(loaded.adapter, {("resid_pre", layer): keep(before, layer) for layer in range(4)}),
          apply_steering(loaded, config, directions) as handle,
          site_hooks(loaded.adapter, {("resid_pre", layer): keep(after, layer) for layer in range(4)})):
        logits(loaded)
    changed = 0
    for layer in range(4):
        proj_before, proj_after = before[layer] @ u, after[layer] @ u
        assert proj_after.max() <= caps[layer] + 1e-4, layer
        below = proj_before <= caps[layer]
        assert torch.equal(after[layer][below], before[layer][below]), layer
        changed += int((~below).sum())
    assert handle.total() == changed > 0


def test_clamp_needs_means_at_the_hooked_site():
    loaded = tiny_model("llama")
    directions = random_directions(loaded)  # measured at mlp_out
    with pytest.raises(UserError, match="--site mlp_out"), apply_steering(
            loaded, SteeringConfig(mode="clamp", site="resid_pre"), directions):
        pass
    with pytest.raises(UserError, match="clamp-level"):
        SteeringConfig(mode="clamp", clamp_level=5.0).validate()

"""Direction variants against an independent numpy computation, and the ablation variants' invariants.

Direction variants (``SteeringConfig.direction_variant``) change only how a direction is computed
from the groups' activations; ablation variants are rows of the mode table (``ablate_norm``,
``ablate_mean``, ``ablate_read``). Each test states what the variant promises and checks it on
raw activations or on hidden states of a tiny random model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment_artifacts.analysis.directions import VARIANTS, direction_from_groups
from alignment_artifacts.errors import UserError
from alignment_artifacts.export import export
from alignment_artifacts.models import site_hooks
from alignment_artifacts.steering import MODES, Steering, SteeringConfig, apply_steering
from tiny_models import FAMILIES, tiny_model
from tiny_steering import logits, random_directions

LAYER = 2


def groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = 32
    scales = rng.uniform(0.2, 3.0, hidden)  # unequal spreads, so standardising changes the direction
    positive = rng.normal(0.5, 1.0, (23, hidden)) * scales + rng.normal(0, 1, hidden)
    negative = rng.normal(0.0, 1.0, (30, hidden)) * scales + 2.0
    return positive, negative


def expected_axis(positive: np.ndarray, negative: np.ndarray, variant: str, k: int) -> np.ndarray:
    """Each variant's direction written from its definition, in numpy float64."""
    diff = positive.mean(0) - negative.mean(0)
    if variant == "mean_diff":
        return diff
    if variant == "harmless_projected":
        m = negative.mean(0) / np.linalg.norm(negative.mean(0))
        return diff - (diff @ m) * m
    if variant == "benign_subspace":
        axes = np.linalg.svd(negative - negative.mean(0), full_matrices=False)[2][:k]
        return diff - axes.T @ (axes @ diff)
    if variant == "standardized":
        n_p, n_n = len(positive), len(negative)
        pooled = ((n_p - 1) * positive.var(0, ddof=1) + (n_n - 1) * negative.var(0, ddof=1)) / (n_p + n_n - 2)
        return diff / np.sqrt(pooled)
    return np.median(positive, 0) - np.median(negative, 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_direction_variant_matches_its_definition(variant):
    positive, negative = groups()
    raw, pos, neg = direction_from_groups(torch.from_numpy(positive), torch.from_numpy(negative), variant=variant,
                                          benign_components=4)
    axis = expected_axis(positive, negative, variant, 4)
    unit = axis / np.linalg.norm(axis)
    diff = positive.mean(0) - negative.mean(0)
    np.testing.assert_allclose(raw.numpy(), (diff @ unit) * unit, rtol=1e-4, atol=1e-5)  # d's part along u
    np.testing.assert_allclose(neg.numpy(), negative.mean(0), rtol=1e-5)  # the centres stay the group means
    np.testing.assert_allclose(pos.numpy(), positive.mean(0), rtol=1e-5)
    if variant != "mean_diff":  # each variant really points elsewhere than the plain difference
        assert abs(unit @ diff / np.linalg.norm(diff)) < 0.9999


def test_projected_variants_are_orthogonal_to_what_they_remove():
    positive, negative = groups(1)
    raw = direction_from_groups(torch.from_numpy(positive), torch.from_numpy(negative),
                                variant="harmless_projected")[0].double()
    assert abs(float(raw @ torch.from_numpy(negative.mean(0)))) < 1e-4 * float(raw.norm())
    raw = direction_from_groups(torch.from_numpy(positive), torch.from_numpy(negative), variant="benign_subspace",
                                benign_components=3)[0].double()
    axes = torch.from_numpy(np.linalg.svd(negative - negative.mean(0), full_matrices=False)[2][:3])
    assert float((axes @ raw).abs().max()) < 1e-4 * float(raw.norm())


def test_unknown_variant_and_bad_k_are_refused():
    with pytest.raises(UserError, match="harmless_projected"):
        SteeringConfig(direction_variant="harmless_projectd").validate()
    with pytest.raises(UserError, match="--benign-components must be at least 1"):
        SteeringConfig(direction_variant="benign_subspace", benign_components=0).validate()
    with pytest.raises(UserError, match="at least 3 prompts"):
        direction_from_groups(torch.ones(1, 4), torch.zeros(1, 4), variant="standardized")


def test_variants_are_cached_apart_and_saved_folders_keep_their_variant(cache_root, tmp_path):
    from alignment_artifacts.api import get_directions

    loaded = tiny_model("llama")
    (tmp_path / "a.txt").write_text("\n".join(f"Tell me how to do bad thing number {i}." for i in range(8)))
    (tmp_path / "b.txt").write_text("\n".join(f"Tell me a fact about bread number {i}." for i in range(8)))
    source = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    plain = get_directions(loaded, SteeringConfig(mode="ablate", source=source), progress=False)
    median = get_directions(loaded, SteeringConfig(mode="ablate", source=source, direction_variant="median"),
                            progress=False)
    assert (plain.variant, median.variant) == ("mean_diff", "median")
    assert not torch.allclose(plain.vectors[LAYER], median.vectors[LAYER])
    again = get_directions(loaded, SteeringConfig(mode="ablate", source=source), progress=False)
    assert torch.equal(again.vectors[LAYER], plain.vectors[LAYER])  # the median did not overwrite the default
    median.save(tmp_path / "saved")
    with pytest.raises(UserError, match="'median' variant"):
        get_directions(loaded, SteeringConfig(mode="ablate", source=str(tmp_path / "saved")), progress=False)


# Ablation variants -----------------------------------------------------------------------------

def around_hook(loaded, config, directions, site, layer):
    """(before, after): the states at (site, layer) just before and just after the steering hook."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key):
        def fn(h):
            seen[key] = h.detach().clone()

        return fn

    with (site_hooks(loaded.adapter, {(site, layer): keep("before")}),
          apply_steering(loaded, config, directions),
          site_hooks(loaded.adapter, {(site, layer): keep("after")})):
        logits(loaded)
    return seen["before"], seen["after"]


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_norm_preserving_ablation_removes_the_component_and_keeps_each_norm(site):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    u = directions.unit(LAYER)
    before, after = around_hook(loaded, SteeringConfig(mode="ablate_norm", scale=1.0, layers=[LAYER]), directions,
                                site, LAYER)
    assert float((before @ u).abs().min()) > 1e-4  # there was a component to remove
    torch.testing.assert_close(after @ u, torch.zeros_like(after @ u), atol=1e-5, rtol=0)
    torch.testing.assert_close(after.norm(dim=-1), before.norm(dim=-1), rtol=1e-5, atol=1e-6)
    plain = before - (before @ u)[..., None] * u  # the same direction as plain ablation's result
    torch.testing.assert_close(after / after.norm(dim=-1, keepdim=True), plain / plain.norm(dim=-1, keepdim=True),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("s", [1.0, 0.5])
def test_mean_replacement_sets_the_component_to_the_ordinary_mean_projection(s):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)  # measured at mlp_out: the mode hooks that site, every layer
    u = directions.unit(1)
    config = SteeringConfig(mode="ablate_mean", scale=s, direction_layer=1)
    before, after = around_hook(loaded, config, directions, "mlp_out", LAYER)
    target = directions.negative_mean[LAYER] @ u  # the hooked layer's own ordinary mean
    expected = (1 - s) * (before @ u) + s * target
    torch.testing.assert_close(after @ u, expected, rtol=1e-4, atol=1e-4)
    rest = lambda h: h - (h @ u)[..., None] * u  # noqa: E731
    torch.testing.assert_close(rest(after), rest(before), rtol=1e-4, atol=1e-4)  # nothing else moves


def test_read_side_ablation_clears_what_attention_and_mlp_read_but_not_the_stream():
    loaded = tiny_model("llama")
    block = loaded.adapter.block(LAYER)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norm gains, so a gain folded in the wrong place would show
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
    directions = random_directions(loaded)
    u = directions.unit(LAYER)
    seen: dict[str, torch.Tensor] = {}

    def reads(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    handles = [block.self_attn.register_forward_pre_hook(reads("attn"), with_kwargs=True),
               block.mlp.register_forward_pre_hook(reads("mlp"), with_kwargs=True),
               block.register_forward_pre_hook(reads("stream"), with_kwargs=True)]
    try:
        with apply_steering(loaded, SteeringConfig(mode="ablate_read", scale=1.0, layers=[LAYER]), directions):
            logits(loaded)
        steered = dict(seen)
        logits(loaded)
    finally:
        for handle in handles:
            handle.remove()
    for name, norm in (("attn", block.input_layernorm), ("mlp", block.post_attention_layernorm)):
        unscaled = steered[name] / norm.weight.detach()  # the normalised input before the norm's gain
        assert float((seen[name] / norm.weight.detach() @ u).abs().max()) > 1e-3  # unsteered, there was a component
        assert float((unscaled @ u).abs().max()) < 1e-4, name
    torch.testing.assert_close(steered["stream"], seen["stream"])  # the residual stream keeps its component


@pytest.mark.parametrize("family", FAMILIES)
def test_read_side_ablation_runs_or_refuses_clearly_on_every_family(family):
    loaded = tiny_model(family)
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate_read", scale=1.0, layers=[1, 2])
    if not loaded.adapter.spec.read_norms:
        with pytest.raises(UserError, match="one norm"), apply_steering(loaded, config, directions):
            pass
        return
    plain = logits(loaded)
    with apply_steering(loaded, config, directions) as handle:
        steered = logits(loaded)
    assert handle.total() > 0 and not torch.allclose(steered, plain)
    assert set(handle.interventions()) == {"attn_in.1", "mlp_in.1", "attn_in.2", "mlp_in.2"}


@pytest.mark.parametrize("mode", [m for m, spec in MODES.items() if spec.not_bakeable])
def test_non_bakeable_ablation_variants_refuse_export_with_the_reason(mode, tmp_path):
    loaded = tiny_model("llama")
    steering = Steering(SteeringConfig(mode=mode, scale=1.0), random_directions(loaded))
    with pytest.raises(UserError, match=f"'{mode}' cannot be baked.*{MODES[mode].not_bakeable[:20]}"):
        export(loaded, steering, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()
    assert export(loaded, steering, tmp_path / "vectors", format="vectors").is_dir()  # hooks-only formats work


def test_a_variant_direction_bakes_exactly_like_the_plain_one(tmp_path):
    """Direction variants change only the vector, so ablate with any of them stays bakeable (bake == hooked)."""
    from test_export import hooked_logits, real_logits, reload

    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    rng = np.random.default_rng(0)
    for layer in directions.layers:  # the standardized direction of random groups at every layer
        positive, negative = rng.normal(0.3, 1.0, (12, 64)), rng.normal(0, 2.0, (12, 64))
        directions.vectors[layer] = direction_from_groups(torch.from_numpy(positive), torch.from_numpy(negative),
                                                          variant="standardized")[0]
    config = SteeringConfig(mode="ablate", scale=1.0, direction_layer=2, direction_variant="standardized")
    expected = hooked_logits(loaded, config, directions)
    out = export(loaded, Steering(config, directions), tmp_path / "baked", format="hf")
    baked = real_logits(reload(out), loaded.tokenizer)
    assert float((baked - expected).abs().max() / expected.abs().max()) < 1e-4

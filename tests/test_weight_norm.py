"""ablate_weight_norm: norm-preserving ablation defined on weights, applied by editing them, baked the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.export import bake_ablation, export
from alignment_artifacts.models import wrap_model
from alignment_artifacts.serve.schemas import ApiError, SteeringOverride, steering_for
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
from alignment_artifacts.steering.weights import write_direction
from test_export import hooked_logits, one_thread, real_logits, relative_error, reload, snapshot  # noqa: F401
from tiny_models import tiny_model

MODE = "ablate_weight_norm"
FAMILIES = ("llama", "qwen2", "gpt2", "qwen2_moe")  # plain, biased, Conv1D, stacked experts
CONFIG = SteeringConfig(mode=MODE, scale=1.0, direction_layer=2)  # every layer: the embeddings too


def directions_for(loaded):
    from tiny_steering import random_directions

    return random_directions(loaded)


def written(loaded, name: str, axis: int) -> torch.Tensor:
    """The vectors a writer writes (hidden units last), one expert after another for stacked experts."""
    return loaded.model.get_parameter(name).detach().float().clone().movedim(axis, -1)


def writer_vectors(loaded, config, directions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{writer name: (its vectors written, the unit direction removed from them)} for every term."""
    adapter, out = loaded.adapter, {}
    for term in Steering(config, directions).bake_terms(adapter.n_layers):
        u = write_direction(adapter, term.site, term.layer, directions.unit(term.source)).float()
        for writer in adapter.writers(term.site, term.layer):
            out[writer.name] = (written(loaded, writer.name, writer.axis), u)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_bake_equals_apply_and_apply_leaves_no_trace(family, tmp_path):
    loaded = tiny_model(family, layers=3)
    directions = directions_for(loaded)
    before, plain = snapshot(loaded.model), real_logits(loaded.model, loaded.tokenizer)
    applied = hooked_logits(loaded, CONFIG, directions)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())  # bit-identical after
    out = export(loaded, Steering(CONFIG, directions), tmp_path / "baked", format="hf")
    baked = real_logits(reload(out), loaded.tokenizer)
    assert relative_error(baked, applied) < 1e-5, family
    assert relative_error(applied, plain) > 1e-2  # it does act
    ablated = hooked_logits(loaded, SteeringConfig(mode="ablate", scale=1.0, direction_layer=2), directions)
    assert relative_error(applied, ablated) > 1e-3  # and is not plain ablation


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vector_written_keeps_its_norm_and_loses_the_direction(family):
    loaded = tiny_model(family, layers=3)
    directions = directions_for(loaded)
    original = writer_vectors(loaded, CONFIG, directions)
    with apply_steering(loaded, CONFIG, directions):
        edited = writer_vectors(loaded, CONFIG, directions)
    plain_ablate = SteeringConfig(mode="ablate", scale=1.0, direction_layer=2)
    baked_ablate, _ = bake_ablation(loaded, Steering(plain_ablate, directions))
    ablated = writer_vectors(wrap_model(baked_ablate, loaded.tokenizer), plain_ablate, directions)
    assert edited.keys() == original.keys() == ablated.keys() and len(edited) > 6
    shrunk = []  # how much plain ablation shortens each writer's vectors at most
    for name, (w, u) in original.items():
        new, plain = edited[name][0], ablated[name][0]
        torch.testing.assert_close(new.norm(dim=-1), w.norm(dim=-1), rtol=1e-5, atol=1e-6)
        assert (new @ u).abs().max() < 1e-5 * w.abs().max(), name
        # the rescaling is what tells it from plain ablation: the same directions, the original norms
        shrunk.append(float((1 - plain.norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-12)).max()))
        rescaled = plain * (w.norm(dim=-1, keepdim=True) / plain.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        torch.testing.assert_close(new, rescaled, rtol=1e-4, atol=1e-6)
    assert min(shrunk) > 0 and max(shrunk) > 0.05, shrunk


def test_weights_come_back_bit_for_bit_after_an_exception_and_a_tied_head_stays_tied():
    loaded = tiny_model("qwen2", layers=3, tied=True)
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    directions = directions_for(loaded)
    before, head = snapshot(model), model.lm_head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="inside"), apply_steering(loaded, CONFIG, directions):
        assert torch.equal(model.lm_head.weight, head)  # the head keeps the original, as the baked copy's does
        assert not torch.equal(model.model.embed_tokens.weight, head)
        raise RuntimeError("inside the block")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_what_needs_hooks_is_refused_with_the_reason():
    loaded = tiny_model("llama", layers=3)
    directions = directions_for(loaded)
    with pytest.raises(UserError, match=r"edits the model's weights.*gated per prompt"):
        SteeringConfig(mode=MODE, gate_layer=1).validate()
    with pytest.raises(UserError, match="some rows of a batch"), apply_steering(loaded, CONFIG, directions,
                                                                              wrap=lambda fn: fn):
        pass
    with pytest.raises(ApiError, match="edits the model's weights"):
        steering_for(SteeringConfig(), SteeringOverride(mode=MODE), allow_direction_overrides=False)
    with pytest.raises(UserError, match="projects the residual stream"), apply_steering(
            loaded, SteeringConfig(mode=MODE, scale=1.0, site="resid_pre"), directions):
        pass
    with pytest.raises(UserError, match="not a constant vector"):
        Steering(CONFIG, directions).control_vector(loaded.adapter.n_layers)


def test_gguf_export_bakes_what_hf_bakes(tmp_path, cache_root):
    from test_export_gguf import GGUF_NAMES, baked_weights, dequantized, gguf_tensors, tiny_gguf

    path, loaded = tiny_gguf(tmp_path, "F32")
    directions = directions_for(loaded)
    out = export(loaded, Steering(CONFIG, directions), tmp_path / "normed.gguf", format="gguf")
    expected, written_tensors = baked_weights(loaded, CONFIG, directions), gguf_tensors(out)
    for gguf_name, hf_name in GGUF_NAMES.items():
        got = dequantized(written_tensors[gguf_name])
        assert np.abs(got - expected[hf_name]).max() <= 1e-5 * np.abs(expected[hf_name]).max(), gguf_name
    assert not np.array_equal(dequantized(written_tensors["token_embd.weight"]),
                              dequantized(gguf_tensors(path)["token_embd.weight"]))

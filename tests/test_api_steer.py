"""``api.suppress_prompt`` and ``api.steer`` on a tiny random model: what they return, that steering
changes the model's output, and that the model is unmodified again afterwards."""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts import api
from alignment_artifacts.models import GenerationConfig, generate
from alignment_artifacts.steering import SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import logits, random_directions

PROMPT = "Please write something kind about person number 3."
ANSWER = GenerationConfig(max_tokens=6, ignore_end_tokens=True)  # a fixed length: countable interventions


def write_prompt_files(folder) -> str:
    """A POSITIVE,NEGATIVE pair of prompt files (a direction source) under ``folder``."""
    positive, negative = folder / "positive.txt", folder / "negative.txt"
    positive.write_text("\n".join(f"Please write something rude about person number {i}." for i in range(10)))
    negative.write_text("\n".join(f"Please write something kind about person number {i}." for i in range(10)))
    return f"{positive},{negative}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_prompt_files(tmp_path_factory.mktemp("prompts"))


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", layers=3)


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_suppress_prompt_returns_the_plain_and_the_steered_answer(cache_root, loaded, source):
    result = api.suppress_prompt(PROMPT, loaded, mode="always", scale=4.0, generation=ANSWER, source=source)
    assert no_hooks(loaded.model)
    assert result.prompt == PROMPT and result.model == loaded.info.name
    assert set(result.seconds) == {"baseline", "steered"}
    plain = generate(loaded, [PROMPT], ANSWER)
    assert result.baseline == plain.texts[0]
    config = SteeringConfig.from_json(result.config)
    assert (config.mode, config.scale, config.source) == ("always", 4.0, source)
    directions = api.get_directions(loaded, config)  # collected by the call, now read from the cache
    assert len(list((cache_root / "directions").iterdir())) == 1
    with apply_steering(loaded, config, directions):
        assert result.steered == generate(loaded, [PROMPT], ANSWER).texts[0]
    assert result.steered != result.baseline
    # 'always' changes every position of every hooked layer: the prompt, then one per decoding step
    per_layer = plain.prompt_lengths[0] + ANSWER.max_tokens - 1
    assert result.interventions == {f"{directions.site}.{layer}": per_layer for layer in directions.layers}
    assert result.to_json()["interventions"] == result.interventions


def test_suppress_prompt_without_comparison_and_with_mode_none(cache_root, loaded, source):
    plain = generate(loaded, [PROMPT], ANSWER).texts[0]
    none = api.suppress_prompt(PROMPT, loaded, mode="none", generation=ANSWER)
    assert none.baseline == none.steered == plain and none.interventions == {}
    assert not (cache_root / "directions").exists()  # mode none needs no directions
    alone = api.suppress_prompt(PROMPT, loaded, mode="always", scale=4.0, compare=False, generation=ANSWER,
                                source=source)
    assert alone.baseline is None and set(alone.seconds) == {"steered"} and alone.steered != plain


@pytest.mark.parametrize(("scale", "expected"), [(1.0, 1.0), (0.5, 0.5)])
def test_suppress_prompt_auto_without_a_stored_result_is_ablation(cache_root, loaded, source, scale, expected):
    result = api.suppress_prompt(PROMPT, loaded, mode="auto", scale=scale, compare=False, generation=ANSWER,
                                 source=source)
    config = SteeringConfig.from_json(result.config)
    assert config.mode == "ablate" and config.scale == expected
    assert config.direction_layer == api.default_direction_layer(loaded.adapter.n_layers)
    assert "no stored optimize result" in config.notes["auto"]
    n = loaded.adapter.n_layers  # ablation hooks every write into the residual stream
    assert set(result.interventions) == {"resid_pre.0"} | {f"{site}.{layer}" for layer in range(n)
                                                          for site in ("attn_out", "mlp_out")}


def test_steer_changes_output_inside_and_restores_it_after(loaded):
    directions = random_directions(loaded)
    plain_logits = logits(loaded)
    plain_tokens = generate(loaded, [PROMPT], ANSWER).tokens
    with api.steer(loaded, directions=directions, mode="always", scale=8.0, layers=[1, 2]) as handle:
        steered_logits = logits(loaded)
        steered_tokens = generate(loaded, [PROMPT], ANSWER).tokens
        assert handle.config.layers == [1, 2] and set(handle.interventions()) == {"mlp_out.1", "mlp_out.2"}
    assert not torch.allclose(steered_logits, plain_logits)
    assert steered_tokens != plain_tokens
    assert no_hooks(loaded.model)
    assert torch.equal(logits(loaded), plain_logits)
    assert generate(loaded, [PROMPT], ANSWER).tokens == plain_tokens


def test_steer_resolves_the_config_and_restores_after_an_error(loaded):
    directions = random_directions(loaded)
    plain = logits(loaded)
    with pytest.raises(RuntimeError, match="inside"), api.steer(loaded, SteeringConfig(mode="ablate"),
                                                                 directions) as handle:
        assert handle.config.direction_layer == api.default_direction_layer(loaded.adapter.n_layers)
        assert not torch.allclose(logits(loaded), plain)
        raise RuntimeError("inside")
    assert no_hooks(loaded.model)
    assert torch.equal(logits(loaded), plain)
    with api.steer(loaded, mode="none") as handle:  # nothing installed: bit-identical
        assert torch.equal(logits(loaded), plain) and handle.total() == 0


def test_steer_collects_directions_when_none_are_given(cache_root, loaded, source):
    with api.steer(loaded, mode="always", scale=4.0, source=source):
        collected = logits(loaded)
    directions = api.get_directions(loaded, SteeringConfig(mode="always", source=source))
    with apply_steering(loaded, SteeringConfig(mode="always", scale=4.0, source=source), directions):
        assert torch.equal(logits(loaded), collected)
    assert not torch.allclose(collected, logits(loaded))

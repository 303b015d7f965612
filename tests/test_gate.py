"""Per-prompt gates on tiny random models: who decides when, and what a held gate keeps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.models import GenerationConfig, generate, site_hooks
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.steering import Gate, Steering, SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import PROMPTS, logits, random_directions


def unpadded_last_logits(loaded):
    return torch.cat([logits(loaded, [p])[:, -1] for p in PROMPTS])


def _gate_setup(gate_layer=2, site="resid_pre"):
    """Directions at ``site`` and a gate level that lets exactly the prompts past the median through."""
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    directions.site = site
    u = directions.unit(gate_layer)
    seen = []
    with site_hooks(loaded.adapter, {(site, gate_layer): lambda h: seen.append(h[0, -1].detach().clone())}):
        unpadded_last_logits(loaded)
    proj = torch.stack(seen) @ u
    ordered = proj.sort().values  # the cap sits midway between the two middle prompts: no ties
    low, high, cap = float(proj.min()) - 1, float(proj.max()) + 1, float(ordered[1:3].mean())
    directions.negative_mean[gate_layer], directions.positive_mean[gate_layer] = low * u, high * u
    return loaded, directions, (cap - low) / (high - low), proj > cap


def test_gate_in_a_direct_model_call_decides_first_like_the_runner():
    """A direct ``model(...)`` call under a gate runs the same decision as the toolkit's runner: every
    hooked layer acts on the prompts that pass (those below the gate too), the others stay untouched."""
    from alignment_artifacts.models.generation import prefill

    loaded, directions, level, passing = _gate_setup()
    assert 0 < int(passing.sum()) < len(PROMPTS)
    plain = unpadded_last_logits(loaded)
    with apply_steering(loaded, SteeringConfig(mode="always", scale=3.0), directions) as ungated_handle:
        ungated = unpadded_last_logits(loaded)
    gated_config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level)
    with apply_steering(loaded, gated_config, directions) as handle:
        gated = unpadded_last_logits(loaded)
        through_runner = []
        for p in PROMPTS:
            ids = loaded.tokenizer(format_chat(loaded.tokenizer, p), return_tensors="pt",
                                   add_special_tokens=False).input_ids
            through_runner.append(prefill(loaded.model, ids, torch.ones_like(ids)).logits[:, -1])
    assert torch.equal(gated[~passing], plain[~passing])  # ordinary prompts are bit-identical
    torch.testing.assert_close(gated[passing], ungated[passing])
    torch.testing.assert_close(torch.cat(through_runner), gated)
    assert not torch.allclose(gated[passing], plain[passing])
    assert 0 < handle.total() < 2 * ungated_handle.total()
    assert torch.equal(unpadded_last_logits(loaded), plain)


def test_gate_decides_anew_for_a_one_token_prompt_after_a_longer_batch():
    """Each prefill decides, whatever its length: a one-token prompt after a batch of the same size
    does not inherit that batch's decision."""
    from alignment_artifacts.models.generation import decode_step, output_cache, prefill

    loaded, directions, level, passing = _gate_setup()
    config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level)
    texts = [format_chat(loaded.tokenizer, p) for p in PROMPTS]
    long_ids = [loaded.tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids for t in texts]
    seen = []
    with site_hooks(loaded.adapter, {("resid_pre", 2): lambda h: seen.append(h[0, -1].detach().clone())}):
        for token in range(3, 40):
            loaded.model(input_ids=torch.tensor([[token]]))
    steering = Steering(config, directions)
    verdicts = Gate.from_directions(directions, 2, level, torch.device("cpu")).passes(torch.stack(seen))
    assert verdicts.any() and not verdicts.all()
    for first_passes in (True, False):  # a longer prompt decided one way, then a token decided the other way
        longer = long_ids[int(passing.nonzero()[0]) if first_passes else int((~passing).nonzero()[0])]
        token = torch.tensor([[3 + int((~verdicts if first_passes else verdicts).nonzero()[0])]])
        expected_plain = loaded.model(input_ids=token).logits[:, -1]
        with steering.apply(loaded) as handle:
            out = prefill(loaded.model, longer, torch.ones_like(longer))
            mask = torch.ones(1, longer.shape[1] + 1, dtype=torch.long)
            decode_step(loaded.model, out.logits[:, -1].argmax(-1)[:, None], mask, output_cache(out))
            handle.reset()
            single = prefill(loaded.model, token, torch.ones_like(token)).logits[:, -1]
            direct = loaded.model(input_ids=token).logits[:, -1]
            steered_single = handle.total()
        with Steering(replace(config, gate_layer=None), directions).apply(loaded):
            expected_steered = loaded.model(input_ids=token).logits[:, -1]
        expected = expected_plain if first_passes else expected_steered
        assert torch.equal(single, direct)
        torch.testing.assert_close(single, expected)
        assert (steered_single > 0) == (not first_passes)


def test_a_held_gate_keeps_the_given_decisions_and_runs_no_decision_pass():
    """``Gate.hold`` (the server keeps each row's decision): held, each row is steered as told, whatever its
    prompt would decide, through the runner and direct calls alike, and no pass decides; released, prefills decide."""
    from alignment_artifacts.models.generation import prefill
    from alignment_artifacts.models.hooks import attached_passes

    loaded, directions, level, passing = _gate_setup()
    text = format_chat(loaded.tokenizer, PROMPTS[int(passing.nonzero()[0])])  # a prompt the gate lets through
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.repeat(2, 1)
    config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level)
    plain = loaded.model(input_ids=ids).logits[:, -1]
    with apply_steering(loaded, replace(config, gate_layer=None), directions):
        steered = loaded.model(input_ids=ids).logits[:, -1]
    passes = []  # rows of every pass through layer 0: a decision pass adds one
    with apply_steering(loaded, config, directions), \
            site_hooks(loaded.adapter, {("resid_pre", 0): lambda h: passes.append(h.shape[0])}):
        gate = attached_passes(loaded.model)
        assert isinstance(gate, Gate)
        gate.hold(torch.tensor([False, True]))
        held = [prefill(loaded.model, ids, torch.ones_like(ids)).logits[:, -1],
                loaded.model(input_ids=ids).logits[:, -1]]
        held_passes = len(passes)
        gate.hold(None)
        decided = prefill(loaded.model, ids, torch.ones_like(ids)).logits[:, -1]
    assert held_passes == 2 and passes[2:] == [2, 2]
    assert not torch.allclose(plain, steered)
    for rows in held:  # row 0 held shut although its prompt passes; row 1 held open
        torch.testing.assert_close(rows, torch.stack([plain[0], steered[1]]))
    torch.testing.assert_close(decided, steered)


def test_decoding_under_a_gate_without_a_prefill_is_refused():
    from alignment_artifacts.models.generation import decode_step

    loaded, directions, level, _ = _gate_setup()
    token = torch.tensor([[5]])
    with apply_steering(loaded, SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level),
                        directions), pytest.raises(UserError, match="prefill first"):
        decode_step(loaded.model, token, torch.ones(1, 2, dtype=torch.long), None)


def test_answer_perplexity_under_a_gate_follows_generation():
    """Perplexity decides the gate on the prompt, as generation does (not on the answer's last token):
    a prompt the gate lets through scores as under the ungated steering, the others as unsteered."""
    from alignment_artifacts.evaluation import answer_perplexity

    loaded, directions, level, passing = _gate_setup()
    texts = [format_chat(loaded.tokenizer, p) for p in PROMPTS]
    answers = generate(loaded, PROMPTS, GenerationConfig(max_tokens=5, ignore_end_tokens=True)).tokens
    config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level)
    plain = [answer_perplexity(loaded, [t], [a]) for t, a in zip(texts, answers)]
    with apply_steering(loaded, replace(config, gate_layer=None), directions):
        ungated = [answer_perplexity(loaded, [t], [a]) for t, a in zip(texts, answers)]
    with apply_steering(loaded, config, directions):
        gated = [answer_perplexity(loaded, [t], [a]) for t, a in zip(texts, answers)]
    expected = [u if p else q for u, q, p in zip(ungated, plain, passing.tolist())]
    assert gated == pytest.approx(expected, rel=1e-5)
    assert gated != pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_gate_decides_first_then_steers_every_layer_through_decoding(site):
    from alignment_artifacts.evaluation import first_logits

    loaded, directions, level, passing = _gate_setup(site=site)
    config = GenerationConfig(max_tokens=6, ignore_end_tokens=True)
    texts = [format_chat(loaded.tokenizer, p) for p in PROMPTS]
    plain, plain_first = generate(loaded, PROMPTS, config).tokens, first_logits(loaded, texts)
    with apply_steering(loaded, SteeringConfig(mode="always", scale=3.0), directions):
        ungated, ungated_first = generate(loaded, PROMPTS, config).tokens, first_logits(loaded, texts)
    with apply_steering(loaded, SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level),
                        directions) as handle:
        gated, gated_first = generate(loaded, PROMPTS, config).tokens, first_logits(loaded, texts)
        one_by_one = [generate(loaded, [p], config).tokens[0] for p in PROMPTS]
    expected = [u if p else q for u, q, p in zip(ungated, plain, passing.tolist())]
    assert gated == expected == one_by_one
    assert gated != plain
    torch.testing.assert_close(gated_first[passing], ungated_first[passing])
    assert torch.equal(gated_first[~passing], plain_first[~passing])
    per_site = handle.interventions()
    assert per_site[f"{site}.0"] > 0 and per_site[f"{site}.2"] > 0  # below and at the gate layer (2)


def test_gated_first_logits_skip_the_shared_prefix():
    """A prefix computed once cannot know which prompts the gate lets through, so gated passes must not
    reuse it. The direction is chosen so that the shared prefix alone would pass the gate."""
    from alignment_artifacts.evaluation import first_logits
    from alignment_artifacts.models.generation import common_prefix_length

    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    directions.site = "resid_pre"
    texts = [format_chat(loaded.tokenizer, p, system="You are a helpful assistant who answers well.")
             for p in PROMPTS]
    rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = torch.tensor([rows[0][:common_prefix_length(rows)]])
    seen = []
    with site_hooks(loaded.adapter, {("resid_pre", 2): lambda h: seen.append(h[0, -1].detach().clone())}):
        loaded.model(input_ids=prefix)
        for row in rows:
            loaded.model(input_ids=torch.tensor([row]))
    directions.vectors[2] = seen[0]
    u = directions.unit(2)
    prefix_proj, proj = float(seen[0] @ u), torch.stack(seen[1:]) @ u
    assert prefix_proj > float(proj.min())
    low, high = min(prefix_proj, float(proj.min())) - 1, max(prefix_proj, float(proj.max())) + 1
    directions.negative_mean[2], directions.positive_mean[2] = low * u, high * u
    level = ((prefix_proj + float(proj.min())) / 2 - low) / (high - low)
    config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=level)
    with apply_steering(loaded, config, directions):
        batched = first_logits(loaded, texts, batch_size=4)
        single = torch.cat([first_logits(loaded, [t]) for t in texts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_gate_bad_input_and_export_refusal():
    from alignment_artifacts.export import control_vectors

    loaded, directions, level, _ = _gate_setup()
    with pytest.raises(UserError, match="gate-level"):
        SteeringConfig(mode="clamp", gate_layer=1, gate_level=float("nan")).validate()
    with pytest.raises(UserError, match="out of range"), apply_steering(
            loaded, SteeringConfig(mode="always", gate_layer=7), directions):
        pass
    with pytest.raises(UserError, match="gated per prompt"):
        control_vectors(loaded, Steering(SteeringConfig(mode="always", gate_layer=2, gate_level=level), directions))
    config = SteeringConfig(mode="clamp", gate_layer=2, gate_level=0.25)
    assert SteeringConfig.from_json(config.to_json()) == config

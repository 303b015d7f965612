"""Rows that finish leave the running batch: the model computes less, and every answer stays what it
would be alone (tiny random models, with and without steering, with a per-prompt gate)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from alignment_artifacts.models.generation import GenerationConfig, encode_batch, format_chat, generate_ids, trim
from alignment_artifacts.steering import SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import PROMPTS, random_directions

LONGER = [*PROMPTS, "List three colours.", "What is a prime number?", "Say hi.", "Describe a quiet morning."]
STEPS = 12


CONFIG = GenerationConfig(max_tokens=STEPS, repetition_penalty=1.3)  # the penalty reads each row's own history


def _free_run(loaded, texts):
    """Every row's tokens when nothing stops (no stop ids)."""
    ids, mask = encode_batch(loaded.tokenizer, texts, "cpu")
    gen, _, _ = generate_ids(loaded.model, ids, mask, CONFIG)
    return gen


def _staggered_stops(free: torch.Tensor) -> list[int]:
    """Stop ids meant to end row i at step 2 + i: its token there, unless some row says it in its first
    two steps (each row ends where its first stop appears, so no row ends before step 2)."""
    early = set(free[:, :2].flatten().tolist())
    wanted = (int(free[i, 2 + i % (STEPS - 2)]) for i in range(free.shape[0]))
    return sorted({token for token in wanted if token not in early})


def _run(loaded, texts, stops):
    """Answers of one batch, and the width of every forward pass of the model."""
    widths = []
    handle = loaded.model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        ids, mask = encode_batch(loaded.tokenizer, texts, "cpu")
        gen, alive, first = generate_ids(loaded.model, ids, mask, CONFIG, stops)
    finally:
        handle.remove()
    return trim(gen, alive, stops), widths, first


def _check(loaded, texts, stops):
    batched, widths, first = _run(loaded, texts, stops)
    alone = [_run(loaded, [t], stops) for t in texts]
    assert batched == [a[0][0] for a in alone]
    torch.testing.assert_close(first, torch.cat([a[2] for a in alone]), rtol=1e-4, atol=1e-4)
    lengths = [len(row) for row in batched]
    assert min(lengths) < max(lengths) and min(lengths) < STEPS - 2  # rows finished at different steps
    assert widths[0] == len(texts) and min(widths) < len(texts)  # and left the batch
    assert widths == sorted(widths, reverse=True)
    return batched


@pytest.mark.parametrize("family", ["llama", "olmo3"])  # olmo3: sliding-window layers in the cache
def test_finished_rows_leave_the_batch_and_answers_equal_answers_alone(family):
    loaded = tiny_model(family)
    texts = [format_chat(loaded.tokenizer, p) for p in LONGER]
    _check(loaded, texts, _staggered_stops(_free_run(loaded, texts)))


def test_finished_rows_leave_a_steered_batch():
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    texts = [format_chat(loaded.tokenizer, p) for p in LONGER]
    with apply_steering(loaded, SteeringConfig(mode="ablate", scale=1.0, direction_layer=2), directions):
        stops = _staggered_stops(_free_run(loaded, texts))
        _check(loaded, texts, stops)


def test_finished_rows_leave_a_gated_batch_and_the_gate_keeps_the_rest_of_its_decisions():
    """The gate's decisions follow the rows that stay: a row steered alone is steered in the batch."""
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    directions.site = "resid_pre"
    texts = [format_chat(loaded.tokenizer, p) for p in LONGER]
    seen = []
    from alignment_artifacts.models import site_hooks
    with site_hooks(loaded.adapter, {("resid_pre", 2): lambda h: seen.append(h[0, -1].detach().clone())}):
        for t in texts:
            _run(loaded, [t], [])
    u = directions.unit(2)
    proj = torch.stack(seen[::STEPS]) @ u  # the prefill's last token of each prompt
    low, high = float(proj.min()) - 1, float(proj.max()) + 1
    directions.negative_mean[2], directions.positive_mean[2] = low * u, high * u
    cap = float(proj.sort().values[3:5].mean())  # half the prompts pass
    gated = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=(cap - low) / (high - low))
    plain_stops = _staggered_stops(_free_run(loaded, texts))
    with apply_steering(loaded, gated, directions):
        stops = sorted(set(plain_stops) | set(_staggered_stops(_free_run(loaded, texts))))
        with_gate = _check(loaded, texts, stops)
    without = _run(loaded, texts, stops)[0]
    passing = (proj > cap).tolist()
    assert 0 < sum(passing) < len(texts)
    assert [a == b for a, b in zip(with_gate, without)] != [True] * len(texts)  # the gate steered some rows
    assert all(a == b for a, b, p in zip(with_gate, without, passing) if not p)  # and left the others alone


def test_evaluation_answers_continue_the_shared_prefix_and_equal_answers_alone():
    from alignment_artifacts.evaluation.passes import generate_answers
    from alignment_artifacts.models.generation import shared_prefix

    loaded = tiny_model("llama")
    texts = [format_chat(loaded.tokenizer, p, system="You are a careful assistant who answers briefly.")
             for p in LONGER]
    rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix(loaded.model, rows, "cpu").length >= 8  # the system turn is run once
    together = generate_answers(loaded, texts, 10, batch_size=3)
    alone = [generate_answers(loaded, [t], 10) for t in texts]
    assert together.ids == [a.ids[0] for a in alone] and together.texts == [a.texts[0] for a in alone]
    torch.testing.assert_close(together.first_logits, torch.cat([a.first_logits for a in alone]),
                               rtol=1e-4, atol=1e-4)


def _queued(loaded, texts, stops, width):
    """Answers from ``generate_queued`` and its passes as (prefill?, rows) in order."""
    from alignment_artifacts.models.generation import generate_queued

    passes = []
    handle = loaded.model.register_forward_pre_hook(
        lambda m, args, kwargs: passes.append((kwargs["input_ids"].shape[1] > 1, kwargs["input_ids"].shape[0])),
        with_kwargs=True)
    try:
        rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids, first = generate_queued(loaded.model, rows, STEPS, stops, width, 0, "cpu")
    finally:
        handle.remove()
    return ids, first, passes


def _greedy_free_run(loaded, texts):
    ids, mask = encode_batch(loaded.tokenizer, texts, "cpu")
    return generate_ids(loaded.model, ids, mask, GenerationConfig(max_tokens=STEPS))[0]


@pytest.mark.parametrize("steered", [False, True])
def test_queued_prompts_join_as_rows_finish_and_answers_equal_answers_alone(steered):
    loaded = tiny_model("llama")
    joined = _queued_equals_alone(loaded, steered)
    assert joined  # a prefill of new prompts, then a step of them with rows already running


def test_queued_prompts_wait_for_a_sliding_window_cache_to_empty():
    """A sliding-window layer keeps its last tokens, not one column per position: rows leave it, none join."""
    assert not _queued_equals_alone(tiny_model("olmo3"), steered=False)


def _queued_equals_alone(loaded, steered):
    directions = random_directions(loaded)
    texts = [format_chat(loaded.tokenizer, p) for p in LONGER]
    steering = SteeringConfig(mode="ablate" if steered else "none", scale=1.0, direction_layer=2)
    with apply_steering(loaded, steering, directions):
        stops = _staggered_stops(_greedy_free_run(loaded, texts))
        ids, first, passes = _queued(loaded, texts, stops, width=3)
        alone = [_queued(loaded, [t], stops, width=3) for t in texts]
    assert ids == [a[0][0] for a in alone]
    torch.testing.assert_close(first, torch.cat([a[1] for a in alone]), rtol=1e-4, atol=1e-4)
    assert len({len(row) for row in ids}) > 1
    assert max(width for _, width in passes) <= 3
    return any(prefill and not after_prefill and width_after > width
               for (prefill, width), (after_prefill, width_after) in pairwise(passes))


def test_queued_prompts_under_a_gate_wait_for_the_running_batch_and_keep_their_decisions():
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    directions.site = "resid_pre"
    texts = [format_chat(loaded.tokenizer, p) for p in LONGER]
    u = directions.unit(2)
    directions.negative_mean[2], directions.positive_mean[2] = -3 * u, 3 * u
    gated = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=0.5)
    stops = _staggered_stops(_greedy_free_run(loaded, texts))
    plain = _queued(loaded, texts, stops, width=3)[0]
    with apply_steering(loaded, gated, directions):
        ids, _, passes = _queued(loaded, texts, stops, width=3)
        alone = [_queued(loaded, [t], stops, width=3)[0][0] for t in texts]
    assert ids == alone
    assert 0 < sum(a != b for a, b in zip(ids, plain)) < len(texts)  # the gate steered some prompts only
    prefills = [i for i, (prefill, _) in enumerate(passes) if prefill]
    decision_passes = len(prefills) // 2  # each prefill under a gate runs its decision pass first
    assert decision_passes == -(-len(texts) // 3)  # static batches of 3: no prompt joined a running batch


def test_queued_rows_stay_in_a_cache_they_cannot_leave(monkeypatch):
    """A cache without row selection keeps its finished rows (fed padding, not recorded) until all are done."""
    from alignment_artifacts.models import generation

    monkeypatch.setattr(generation, "droppable", lambda cache: False)
    loaded = tiny_model("llama")
    assert not _queued_equals_alone(loaded, steered=False)  # no prompt joined a running batch


def test_queued_rows_keep_their_own_token_limits():
    """Prompts of several kinds share one queue, each row stopping at its own limit."""
    from alignment_artifacts.models.generation import generate_queued

    loaded = tiny_model("llama")
    rows = [loaded.tokenizer(format_chat(loaded.tokenizer, t), add_special_tokens=False)["input_ids"] for t in LONGER]
    limits = [2 + i % 5 for i in range(len(rows))]
    ids, first = generate_queued(loaded.model, rows, limits, [], 3, 0, "cpu")
    alone = [generate_queued(loaded.model, [r], n, [], 3, 0, "cpu") for r, n in zip(rows, limits)]
    assert [len(a) for a in ids] == limits  # no stop ids: every row runs to its own limit
    assert ids == [a[0][0] for a in alone]
    torch.testing.assert_close(first, torch.cat([a[1] for a in alone]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="token limits"):
        generate_queued(loaded.model, rows, limits[:-1], [], 3, 0, "cpu")


def test_queued_generation_refuses_an_empty_batch():
    from alignment_artifacts.errors import UserError
    from alignment_artifacts.models.generation import generate_queued

    loaded = tiny_model("llama")
    with pytest.raises(UserError, match="at least 1"):
        generate_queued(loaded.model, [[1, 2, 3]], 4, [], 0, 0, "cpu")

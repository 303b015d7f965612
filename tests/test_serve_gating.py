"""Gated steering in the batching engine, and static batches on sliding-window caches.

Driven step by step like test_serve_batching: every request's answer must equal its answer alone
(text, finish reason, token count, interventions), whatever it shared its passes with.
"""

from __future__ import annotations

import pytest

from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.serve import Engine
from alignment_artifacts.serve import engine as engine_module
from test_serve_batching import LIMITS, PROMPTS, SETTINGS, alone, make_job, outcome, run
from tiny_models import tiny_config, tiny_model
from tiny_steering import random_directions

MORE = [*PROMPTS, "How do I bake bread at home with flour, water and yeast?", "Explain how locks and keys work.",
        "Write a short poem about the sea and the sky."]
GATED = {"mode": "always", "scale": 8.0, "gate_layer": 1, "gate_level": -0.5}  # opens some prompts, not others
OTHER_GATE = dict(GATED, gate_level=0.0)  # a second gated configuration


@pytest.fixture(scope="module")
def llama():
    """A tiny random model and random directions for it."""
    model = tiny_model("llama")
    return model, random_directions(model)


def check(model, cases, first, joins, watch=None):
    """Run ``cases`` (the first ``first`` at once, ``joins``: case indices submitted before step k) in one
    engine; every answer equals the one alone. ``watch(engine, step, jobs)`` looks at each step."""
    loaded, directions = model
    expected = [alone(loaded, directions, case) for case in cases]
    engine = Engine(loaded, lambda c, lock: directions, LIMITS, start=False)
    made = [make_job(loaded, directions, p, s, m, stop, **extra) for p, s, m, stop, extra in cases]
    jobs = [job for job, _ in made]
    run(engine, jobs[:first], {k: [jobs[i] for i in v] for k, v in joins.items()},
        None if watch is None else lambda step: watch(engine, step, jobs))
    assert [outcome(events) for _, events in made] == expected
    return engine, expected


def test_gated_rows_share_mixed_batches(llama):
    """Gated rows start with others, join running batches and leave them, in any order."""
    cases = [(MORE[i % len(MORE)], GATED if i % 2 else SETTINGS[i // 2 % len(SETTINGS)], 5 + 3 * (i % 5), [], {})
             for i in range(12)]
    engine, expected = check(llama, cases, 3, {2: [3, 4], 4: [5], 6: [6, 7, 8], 9: [9, 10, 11]})
    gated = [e[4] for e, case in zip(expected, cases) if case[1] is GATED]
    assert min(gated) == 0 < max(gated)  # the gate opened for some prompts and not for others
    assert engine.stats["mixed_passes"] > 0 and engine.stats["max_rows"] >= 6


def test_a_gated_request_does_not_hold_back_later_ones(llama):
    """A gated request arriving while an unsteered batch decodes joins it, and so does one behind it."""
    cases = [(MORE[0], SETTINGS[0], 30, [], {}), (MORE[1], GATED, 8, [], {}), (MORE[2], SETTINGS[0], 8, [], {})]

    def watch(engine, step, jobs):
        if step == 4:  # the long row still decodes; both late requests decode with it
            assert engine.batch.rows[0].job is jobs[0] and not engine.waiting
            assert [row.job for row in engine.batch.rows] == jobs

    check(llama, cases, 1, {3: [1, 2]}, watch)


def test_a_second_gated_configuration_waits_a_bounded_time(llama, monkeypatch):
    """One gate at a time: a request with another gate waits for the first gate's rows, later requests pass
    it for MAX_OVERTAKEN steps at most, then wait behind it until it runs."""
    monkeypatch.setattr(engine_module, "MAX_OVERTAKEN", 3)
    cases = [(MORE[1], GATED, 16, [], {}), (MORE[4], OTHER_GATE, 6, [], {}), (MORE[2], SETTINGS[1], 4, [], {}),
             (MORE[3], SETTINGS[0], 4, [], {})]

    def watch(engine, step, jobs):
        decoding = [row.job for row in engine.batch.rows]
        if step == 3:  # the other gate waits; a request behind it passes it
            assert jobs[1] in engine.waiting and jobs[2] in decoding
        if 6 <= step < 15:  # past the bound: the request behind it waits too, until the first gate leaves
            assert list(engine.waiting) == [jobs[1], jobs[3]] and decoding == [jobs[0]]
        if step == 16:
            assert decoding == [jobs[1], jobs[3]]

    check(llama, cases, 2, {1: [2], 5: [3]}, watch)


# Sliding-window caches: static batches ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sliding():
    """Sliding-window layers (window 16) between full ones, as Gemma 2 has them."""
    model = tiny_model("gemma2")
    return model, random_directions(model)


def test_static_batches_on_a_sliding_window_model(sliding):
    """Rows cannot join a sliding-window cache mid-decode: requests waiting when a batch starts share it,
    later ones the next; rows leave as they finish (the longest prompt first), and every answer equals
    its answer alone, with mixed (and gated) steering over prompts longer than the window."""
    loaded = sliding[0]
    window = tiny_config("gemma2").sliding_window
    cases = [(MORE[4], SETTINGS[1], 3, [], {}), (MORE[0], SETTINGS[0], 12, [], {}),
             (MORE[5], dict(GATED, gate_level=0.5), 9, [], {}), (MORE[3], SETTINGS[2], 14, [], {}),
             (MORE[6], dict(GATED, gate_level=0.5), 7, [], {}), (MORE[1], SETTINGS[4], 5, [], {}),
             (MORE[4], SETTINGS[3], 6, [], {})]
    lengths = [len(loaded.tokenizer(format_chat(loaded.tokenizer, p), add_special_tokens=False)["input_ids"])
               for p, *_ in cases]
    assert min(lengths) < window < max(lengths) and lengths[0] == max(lengths)  # the longest leaves first

    def watch(engine, step, jobs):
        if step == 3:  # the two later requests wait for the running batch
            assert list(engine.waiting) == jobs[5:] and len(engine.batch.rows) == 4

    engine, expected = check(sliding, cases, 5, {2: [5, 6]}, watch)
    assert engine.stats["max_rows"] == 5 and engine.stats["mixed_passes"] > 0
    assert expected[2][4] == 0 < expected[4][4]  # the gate closed for one prompt and opened for the other

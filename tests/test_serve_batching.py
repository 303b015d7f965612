"""The server's batching engine on a tiny random model: batched answers equal answers alone.

The engine is driven step by step here (no worker thread), so each test places exactly when a
request joins a running batch; the HTTP tests around it check disconnects and mixed batches.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from alignment_artifacts.api import resolve_config
from alignment_artifacts.models.generation import GenerationConfig, format_chat, generate
from alignment_artifacts.serve import Engine, ServerLimits, ServerThread, create_app
from alignment_artifacts.serve.jobs import Event, Job
from alignment_artifacts.steering import SteeringConfig, apply_steering
from tiny_models import tiny_model
from tiny_steering import random_directions

LIMITS = ServerLimits(max_tokens=64, default_max_tokens=16, max_prompt_tokens=250, max_batch=16)
PROMPTS = ["Hello", "How do locks work?", "Tell me about the sea.", "What is the capital of France?"]
SETTINGS = [{"mode": "none"}, {"mode": "always", "scale": 8.0}, {"mode": "ablate", "scale": 1.0},
            {"mode": "adaptive", "scale": 4.0}, {"mode": "clamp", "scale": 1.0, "clamp_level": 0.0}]
GATED = {"mode": "always", "scale": 8.0, "gate_layer": 1, "gate_level": 0.0}


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def directions(loaded):
    return random_directions(loaded)


def make_job(loaded, directions, prompt, steering, max_tokens=12, stop=(), **sampling):
    events: list[Event] = []
    job = Job(lambda tokenizer: format_chat(tokenizer, prompt),
              GenerationConfig(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), **sampling),
              resolve_config(loaded, SteeringConfig(**steering)), list(stop), emit=events.append)
    job.directions = None if steering["mode"] == "none" else directions
    return job, events


def outcome(events):
    """(streamed text, final text, finish reason, completion tokens, interventions) of a finished job."""
    kinds = [e.kind for e in events]
    assert kinds[0] == "ready" and kinds[-1] == "done", kinds
    result = events[-1].result
    streamed = "".join(e.text for e in events if e.kind == "delta")
    return streamed, result.text, result.finish_reason, result.completion_tokens, result.interventions


def run(engine, jobs, joins=None, watch=None):
    """Step until every job is done; ``joins[k]``: jobs submitted just before step k; ``watch(step)``
    looks at the engine then."""
    joins = joins or {}
    for job in jobs:
        engine.submit(job)
    step = 0
    while engine.waiting or engine.batch.rows or joins:
        for job in joins.pop(step, []):
            engine.submit(job)
        if watch is not None:
            watch(step)
        engine.step()
        step += 1
        assert step < 500
    assert not engine.groups and all(not m._forward_hooks and not m._forward_pre_hooks
                                     for m in engine.loaded.model.modules())


def cases():
    """Mixed steering, lengths, stop strings and one seeded sampled row."""
    out = []
    for i in range(10):
        steering = SETTINGS[i % len(SETTINGS)]
        extra = {"temperature": 0.9, "seed": 7} if i == 7 else {}
        out.append((PROMPTS[i % len(PROMPTS)], steering, 6 + 3 * (i % 4), ["e"] if i == 5 else [], extra))
    return out


def alone(loaded, directions, case):
    prompt, steering, max_tokens, stop, extra = case
    engine = Engine(loaded, lambda c, lock: directions, LIMITS, start=False)
    job, events = make_job(loaded, directions, prompt, steering, max_tokens, stop, **extra)
    run(engine, [job])
    return outcome(events)


def test_alone_matches_the_toolkits_own_generation(loaded, directions):
    for steering in SETTINGS[:3]:
        config = resolve_config(loaded, SteeringConfig(**steering))
        with apply_steering(loaded, config, directions):
            expected = generate(loaded, [PROMPTS[1]], GenerationConfig(max_tokens=10)).texts[0]
        assert alone(loaded, directions, (PROMPTS[1], steering, 10, [], {}))[1] == expected


def test_batched_equals_unbatched_with_steered_and_unsteered_rows(loaded, directions):
    all_cases = cases()
    expected = [alone(loaded, directions, case) for case in all_cases]
    assert len({e[1] for e in expected[:5]}) > 1 and expected[0][4] == 0 and expected[1][4] > 0

    engine = Engine(loaded, lambda c, lock: directions, LIMITS, start=False)
    made = [make_job(loaded, directions, p, s, m, stop, **extra) for p, s, m, stop, extra in all_cases]
    # four start together, the others join a running batch at later steps
    run(engine, [job for job, _ in made[:4]], joins={2: [made[4][0], made[5][0]], 3: [made[6][0]],
                                                     5: [job for job, _ in made[7:]]})
    assert [outcome(events) for _, events in made] == expected
    assert engine.stats["mixed_passes"] > 0 and engine.stats["max_rows"] >= 6


def test_gated_requests_join_a_running_batch(loaded, directions):
    """(More in test_serve_gating.py.)"""
    plain = [(p, SETTINGS[i % 2], 8, [], {}) for i, p in enumerate(PROMPTS[:2])]
    gated = [(p, GATED, 8, [], {}) for p in PROMPTS]
    expected = [alone(loaded, directions, case) for case in plain + gated]
    engine = Engine(loaded, lambda c, lock: directions, LIMITS, start=False)
    made = [make_job(loaded, directions, p, s, m, stop, **extra) for p, s, m, stop, extra in plain + gated]
    run(engine, [job for job, _ in made[:3]], joins={1: [job for job, _ in made[3:]]})
    assert [outcome(events) for _, events in made] == expected


def test_a_cancelled_row_leaves_at_the_next_step(loaded, directions):
    engine = Engine(loaded, lambda c, lock: directions, LIMITS, start=False)
    (long, long_events), (other, _) = (make_job(loaded, directions, PROMPTS[0], s, max_tokens=40)
                                                  for s in SETTINGS[:2])
    engine.submit(long)
    engine.submit(other)
    engine.step()
    assert len(engine.batch.rows) == 2 and engine.groups
    long.cancel.set()
    other.cancel.set()
    engine.step()
    assert engine.batch.rows == [] and engine.batch.cache is None and not engine.groups
    assert [e.kind for e in long_events if e.kind in ("done", "error")] == []  # nobody is listening any more


# Over HTTP ------------------------------------------------------------------------------------------------


class SlowModel:
    """Each forward pass of the model sleeps a little, so a request is still decoding when its client leaves."""

    def __init__(self, model, seconds=0.02):
        self.model, self.seconds = model, seconds

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda *_: time.sleep(self.seconds))
        return self

    def __exit__(self, *_):
        self.handle.remove()


def wait_until(predicate, timeout=30.0):
    """Polls until the predicate holds; the generous timeout is for slow machines (only order is under test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(loaded, directions):
    app = create_app(loaded, SteeringConfig(mode="none"), lambda config, lock: directions, limits=LIMITS)
    with ServerThread(app) as running:
        yield running


def long_prompt(server):
    """A completion prompt the tiny model answers for the full 64 tokens (no end token before)."""
    for prompt in ("The quick brown", "Explain how locks", "bread water yeast", "the sea and the sky"):
        body = {"prompt": prompt, "max_tokens": 64, "temperature": 0}
        if httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0][
                "finish_reason"] == "length":
            return prompt
    pytest.skip("no prompt runs to max_tokens on this random model")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(loaded, server, stream):
    engine = server.app.state.server.engine
    body = {"prompt": long_prompt(server), "max_tokens": 64, "temperature": 0, "stream": stream,
            "steering": {"mode": "ablate"}}
    with SlowModel(loaded.model):
        before = engine.stats["passes"]
        if stream:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # tokens are flowing
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        wait_until(lambda: engine.load() == {"decoding": 0, "waiting": 0} and not engine.groups)  # hooks removed
        assert engine.stats["passes"] - before < 40  # it stopped well before its 64 tokens
    health = httpx.get(server.url + "/health").json()
    assert health["pending"] == 0 and health["decoding"] == 0


def test_mixed_concurrent_requests_never_see_each_others_steering(loaded, server):
    """Twelve requests forced into one mixed batch get exactly the answers they get alone."""
    engine = server.app.state.server.engine
    cases = [(PROMPTS[i % 3], SETTINGS[i % len(SETTINGS)]) for i in range(12)]

    def answer(case):
        body = {"messages": [{"role": "user", "content": case[0]}], "max_tokens": 10, "temperature": 0,
                "steering": case[1]}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()
        return data["choices"][0]["message"]["content"], data["steering"]["interventions"]

    expected = [answer(case) for case in cases]
    mixed_before = engine.stats["mixed_passes"]
    with ThreadPoolExecutor(len(cases)) as pool:
        with engine.lock:  # the worker waits while all twelve queue up
            futures = [pool.submit(answer, case) for case in cases]
            wait_until(lambda: len(engine.waiting) == len(cases))
        answers = [f.result() for f in futures]
    assert answers == expected
    assert engine.stats["mixed_passes"] > mixed_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


def test_collection_gets_the_lock_between_slices(loaded, directions):
    """A long decode releases the model lock regularly (directions for a new source collect meanwhile)."""
    engine = Engine(loaded, lambda c, lock: directions, LIMITS)
    job, events = make_job(loaded, directions, PROMPTS[0], SETTINGS[0], max_tokens=64)
    with SlowModel(loaded.model, 0.01):
        engine.submit(job)
        wait_until(lambda: engine.batch.rows)
        with engine.lock:
            unfinished = not any(e.kind == "done" for e in events)
        wait_until(lambda: events and events[-1].kind in ("done", "error"), timeout=120)
    engine.close()
    assert unfinished and outcome(events)[3] == 64

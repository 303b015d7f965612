"""Bounded load test of the batching server on the builtin SmolLM2 (loopback only), with mixed steering.

Starts the server in-process on 127.0.0.1 (a free port) and, at each concurrency level, keeps that
many clients busy with greedy chat requests whose steering cycles through unsteered, ablation at two
scales and clamping. Prints one line per level:

    concurrency=N requests/s: X tokens/s: T p50_ms: Y p95_ms: Z errors: E leaks: L diverged: D

then throughput(8) / throughput(1). Level 1 runs first and is the reference: every (prompt,
steering) pair is answered alone there. An answer at a higher level that differs from its own
reference but equals the reference of another steering for the same prompt is a *leak* (it saw
another request's hooks); one that equals no reference is *diverged* (numerical drift between
batch shapes, expected to be rare). Only counts are printed, never completions.
The first run computes the refusal directions (about a minute on CPU); later runs read the cache.

    PYTHONPATH=src python bench/serve_load.py [--quick] [--max-tokens 32] [--levels 1,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from alignment_artifacts.api import get_directions, get_model, resolve_config
from alignment_artifacts.serve import ServerLimits, ServerThread, create_app
from alignment_artifacts.steering import SteeringConfig

PROMPTS = ["Name a fruit.", "Say hello in French."]
STEERINGS: list[dict | None] = [None, {"mode": "ablate", "scale": 1.0}, {"mode": "clamp", "scale": 1.0},
                                {"mode": "ablate", "scale": 0.5}]
PAIRS = [(p, s) for s in range(len(STEERINGS)) for p in range(len(PROMPTS))]  # request i asks PAIRS[i % 8]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def one_request(client: httpx.Client, index: int, max_tokens: int) -> dict:
    """Latency in ms, the answer and its token count (None answer: an error)."""
    prompt, steering = PAIRS[index % len(PAIRS)]
    body: dict = {"model": "smollm2", "temperature": 0, "max_tokens": max_tokens,
                  "messages": [{"role": "user", "content": PROMPTS[prompt]}]}
    if STEERINGS[steering] is not None:
        body["steering"] = STEERINGS[steering]
    started = time.perf_counter()
    answer, tokens = None, 0
    try:
        response = client.post("/v1/chat/completions", json=body)
        if response.status_code == 200:
            data = response.json()
            answer, tokens = data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]
    except httpx.HTTPError:
        pass
    return {"ms": (time.perf_counter() - started) * 1000, "pair": (prompt, steering), "answer": answer,
            "tokens": tokens}


def run_level(url: str, concurrency: int, requests: int, max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=timeout, limits=limits) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda i: one_request(client, i, max_tokens), range(requests)))
        return results, time.perf_counter() - started


def judge(results: list[dict], reference: dict[tuple[int, int], str]) -> tuple[int, int]:
    """(leaks, diverged) against the answers each pair got alone."""
    leaks = diverged = 0
    for result in results:
        (prompt, steering), answer = result["pair"], result["answer"]
        if answer is None or answer == reference.get((prompt, steering)):
            continue
        others = {text for (p, s), text in reference.items() if p == prompt and s != steering}
        leaks += answer in others
        diverged += answer not in others
    return leaks, diverged


def report(concurrency: int, results: list[dict], wall: float, leaks: int, diverged: int) -> float:
    """Print the level's line; its requests/s."""
    done = [r for r in results if r["answer"] is not None]
    errors = len(results) - len(done)
    if not done:
        print(f"concurrency={concurrency} requests/s: 0.00 errors: {errors}", flush=True)
        return 0.0
    latencies = [r["ms"] for r in done]
    rate = len(done) / wall
    print(f"concurrency={concurrency} requests/s: {rate:.2f} tokens/s: {sum(r['tokens'] for r in done) / wall:.1f} "
          f"p50_ms: {statistics.median(latencies):.0f} p95_ms: {percentile(latencies, 0.95):.0f} "
          f"errors: {errors} leaks: {leaks} diverged: {diverged}", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--per-client", type=int, default=4, help="requests per client at each level (level 1: "
                                                                   "at least one per prompt and steering)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--quick", action="store_true", help="2 requests per client, 16 tokens (about 2-3 min)")
    parser.add_argument("--budget-s", type=float, default=1800, help="skip remaining levels after this long")
    args = parser.parse_args()
    if args.quick:
        args.per_client, args.max_tokens = 2, 16
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    loaded = get_model(args.model)
    print(f"model {loaded.info.name} on {loaded.info.device} ({loaded.info.dtype}), "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    directions = get_directions(loaded, resolve_config(loaded, SteeringConfig(mode="ablate")))
    app = create_app(loaded, SteeringConfig(mode="none"),
                     lambda config, lock: get_directions(loaded, config, progress=False, model_lock=lock),
                     limits=ServerLimits(max_tokens=args.max_tokens, max_batch=16))
    print(f"directions ready ({len(directions.layers)} layers); {args.per_client} requests per client, "
          f"max_tokens {args.max_tokens}, steering cycling through {STEERINGS}", flush=True)
    rates: dict[int, float] = {}
    reference: dict[tuple[int, int], str] = {}
    with ServerThread(app) as server:
        engine = app.state.server.engine
        for level in (int(x) for x in args.levels.split(",")):
            if time.perf_counter() - started > args.budget_s:
                print(f"concurrency={level} skipped: over the {args.budget_s:.0f} s budget")
                continue
            requests = max(level * args.per_client, len(PAIRS) if level == 1 else 0)
            results, wall = run_level(server.url, level, requests, args.max_tokens, timeout=args.budget_s)
            if level == 1:
                reference = {r["pair"]: r["answer"] for r in results if r["answer"] is not None}
            rates[level] = report(level, results, wall, *judge(results, reference))
        print(f"engine: {engine.stats['passes']} passes, at most {engine.stats['max_rows']} rows in one, "
              f"{engine.stats['mixed_passes']} with mixed steering", flush=True)
    if rates.get(1) and 8 in rates:
        print(f"throughput(8) / throughput(1): {rates[8] / rates[1]:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()

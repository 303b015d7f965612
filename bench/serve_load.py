"""Bounded load test of the OpenAI-compatible server on the builtin SmolLM2 (loopback only).

Starts the server in-process on 127.0.0.1 (a free port), sends ``--requests`` chat requests at each
concurrency level (half of them with a per-request steering override) and prints one line per level:

    concurrency=N requests/s: X p50_ms: Y p95_ms: Z errors: E

Requests are served one at a time (one model lock), so throughput should stay flat across levels
while latency grows with the queue; a large drop in requests/s would point at locking overhead.
The first run computes the ablation directions (about a minute on CPU); later runs read the cache.

    PYTHONPATH=src python bench/serve_load.py [--requests 16] [--max-tokens 32] [--levels 1,4,16]
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

PROMPTS = ["Name a fruit.", "Name a colour.", "What is 2 + 2?", "Say hello in French."]
STEERING = {"mode": "ablate", "scale": 1.0}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; enough for 16 samples."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def one_request(client: httpx.Client, index: int, max_tokens: int) -> tuple[float, bool]:
    """(latency in ms, ok); every other request carries a steering override."""
    body: dict = {"model": "smollm2", "temperature": 0, "max_tokens": max_tokens,
                  "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]}
    if index % 2:
        body["steering"] = STEERING
    started = time.perf_counter()
    try:
        response = client.post("/v1/chat/completions", json=body)
        ok = response.status_code == 200 and bool(response.json()["choices"][0]["message"]["content"])
    except httpx.HTTPError:
        ok = False
    return (time.perf_counter() - started) * 1000, ok


def run_level(url: str, concurrency: int, requests: int, max_tokens: int, timeout: float) -> str:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=timeout, limits=limits) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda i: one_request(client, i, max_tokens), range(requests)))
        wall = time.perf_counter() - started
    latencies = [ms for ms, ok in results if ok]
    errors = sum(not ok for _, ok in results)
    if not latencies:
        return f"concurrency={concurrency} requests/s: 0.00 p50_ms: - p95_ms: - errors: {errors}"
    return (f"concurrency={concurrency} requests/s: {len(latencies) / wall:.2f} "
            f"p50_ms: {statistics.median(latencies):.0f} p95_ms: {percentile(latencies, 0.95):.0f} errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--budget-s", type=float, default=900, help="skip remaining levels after this long")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    loaded = get_model(args.model)
    print(f"model {loaded.info.name} on {loaded.info.device} ({loaded.info.dtype}), "
          f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    directions = get_directions(loaded, resolve_config(loaded, SteeringConfig(mode="ablate")))
    app = create_app(loaded, SteeringConfig(mode="none"),
                     lambda config, lock: get_directions(loaded, config, progress=False, model_lock=lock),
                     limits=ServerLimits(max_tokens=args.max_tokens))
    print(f"directions ready ({len(directions.layers)} layers); requests: {args.requests} per level, "
          f"max_tokens {args.max_tokens}, half steered with {STEERING}", flush=True)
    with ServerThread(app) as server:
        one_request(httpx.Client(base_url=server.url, timeout=120), 1, 4)  # warm the steered path once
        for level in (int(x) for x in args.levels.split(",")):
            if time.perf_counter() - started > args.budget_s:
                print(f"concurrency={level} skipped: over the {args.budget_s:.0f} s budget")
                continue
            print(run_level(server.url, level, args.requests, args.max_tokens, timeout=args.budget_s / 3),
                  flush=True)


if __name__ == "__main__":
    main()

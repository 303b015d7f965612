"""Steered vs plain greedy generation on the same batches, per mode, at batch 1 and 16.

Prints tokens/s for each and the ratio steered/plain (goal >= 0.95). Each mode's steered run is
bracketed by plain runs on the same inputs; the plain figure is the mean of the two brackets.
With ``--repeats N`` each mode is measured N times and the median ratio is reported, which
damps noise from other processes on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from alignment_artifacts.api import get_directions, get_model, resolve_config
from alignment_artifacts.models import GenerationConfig
from alignment_artifacts.models.generation import encode_batch, format_chat, generate_ids
from alignment_artifacts.prompts import load_builtin
from alignment_artifacts.steering import SteeringConfig, apply_steering

MODES = ("always", "proximity", "adaptive", "sphere", "subspace", "ablate", "clamp", "amplify")


def timed(loaded, ids, mask, tokens):
    started = time.perf_counter()
    out, _, _ = generate_ids(loaded.model, ids, mask, GenerationConfig(max_tokens=tokens, ignore_end_tokens=True))
    return out.numel() / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per mode; the median ratio is kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = get_model(args.model)
    harmless = [p.text for p in load_builtin("harmless").prompts]
    configs = {mode: resolve_config(loaded, SteeringConfig(mode=mode, scale=0.5)) for mode in MODES}
    directions = {mode: get_directions(loaded, config) for mode, config in configs.items()}
    print(f"model: {loaded.info.name}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        texts = [format_chat(loaded.tokenizer, t) for t in harmless[:batch_size]]
        ids, mask = encode_batch(loaded.tokenizer, texts, loaded.device)
        timed(loaded, ids, mask, 2)
        ratios = []
        for mode in MODES:
            runs = []
            for _ in range(args.repeats):
                before = timed(loaded, ids, mask, args.tokens)
                with apply_steering(loaded, configs[mode], directions[mode]):
                    steered = timed(loaded, ids, mask, args.tokens)
                after = timed(loaded, ids, mask, args.tokens)
                runs.append(((before + after) / 2, steered))
            plain, steered = sorted(runs, key=lambda r: r[1] / r[0])[len(runs) // 2]
            ratios.append(steered / plain)
            print(f"batch {batch_size} {mode} plain tok/s: {plain:.2f}")
            print(f"batch {batch_size} {mode} steered tok/s: {steered:.2f}")
            print(f"batch {batch_size} {mode} steered/plain ratio: {steered / plain:.3f}")
        print(f"batch {batch_size} min steered/plain ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()

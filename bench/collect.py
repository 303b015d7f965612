"""Collection throughput against a plain forward pass over the same prompts.

Collection (`collect_activations`, end to end: part files and store included) runs the chat
template's shared prefix once and each batch from its cache; the plain pass runs every prompt
whole, in the same left-padded batches. Prints `collect/plain throughput ratio` (goal >= 1.5),
peak RSS and bytes per prompt. Rounds alternate the two so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from alignment_artifacts.activation_pass import collection_prefix, encode_prompt
from alignment_artifacts.activations import collect_activations
from alignment_artifacts.api import get_model
from alignment_artifacts.models.generation import pad_after_prefix, prefill
from alignment_artifacts.prompts import load_builtin, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per category (default 8: 80 prompts)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = get_model(args.model)
    prompts = select(load_builtin("pairs"), limit=args.pairs * 5, seed=0)
    rows = [encode_prompt(loaded.tokenizer, p.text, None, None).ids for p in prompts.prompts]
    order = sorted(rows, key=len)  # collection's own batching: by length, less padding
    batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    pad_id = loaded.tokenizer.pad_token_id or 0
    shared = collection_prefix(loaded, [encode_prompt(loaded.tokenizer, p.text, None, None)
                                        for p in prompts.prompts]).length
    plain_s = collect_s = 0.0
    store = None
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        prefill(loaded.model, *pad_after_prefix(batches[0], 0, pad_id, loaded.device))  # warm-up
        for round_ in range(args.rounds):
            started = time.perf_counter()
            for batch in batches:
                prefill(loaded.model, *pad_after_prefix(batch, 0, pad_id, loaded.device))
            plain_s += time.perf_counter() - started
            started = time.perf_counter()
            store = collect_activations(loaded, prompts, sites="mlp_out", positions="last", layers="all",
                                        batch_size=args.batch_size, use_cache=False, progress=False,
                                        cache_folder=Path(tmp) / f"round-{round_}")
            collect_s += time.perf_counter() - started
    n = len(rows) * args.rounds
    manifest = store.manifest if store is not None else {}
    print(f"model: {loaded.info.name}")
    print(f"prompts: {len(rows)} x {args.rounds} rounds, batch size {args.batch_size}")
    print(f"mean prompt tokens: {sum(map(len, rows)) / len(rows):.1f}")
    print(f"shared prefix tokens: {shared}")
    print(f"plain throughput (prompts/s): {n / plain_s:.3f}")
    print(f"collect throughput (prompts/s): {n / collect_s:.3f}")
    print(f"collect/plain throughput ratio: {plain_s / collect_s:.3f}")
    print(f"peak RSS (MB): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"bytes per prompt (mlp_out, last, float16): {manifest.get('bytes_per_prompt')}")
    print(f"full-capture bytes per prompt (every token, every layer's MLP output, float16): "
          f"{manifest.get('full_capture_bytes_per_prompt')}")
    print(f"storage ratio vs full capture: {manifest.get('storage_ratio_vs_full_mlp_capture')}")


if __name__ == "__main__":
    main()

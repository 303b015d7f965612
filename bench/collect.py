"""Collection throughput against a plain forward pass over the same batches.

Prints `collect/plain throughput ratio` (goal >= 0.95), peak RSS and bytes per prompt. Batches
alternate between the two paths so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from alignment_artifacts import activations as act
from alignment_artifacts.api import get_model
from alignment_artifacts.models.generation import positions_from_mask
from alignment_artifacts.models.hooks import site_hooks
from alignment_artifacts.prompts import load_builtin, select


def padded(loaded, encoded):
    length = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), length), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, length - len(e.ids):] = torch.tensor(e.ids)
        mask[row, length - len(e.ids):] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per category (default 8: 80 prompts)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = get_model(args.model)
    prompts = select(load_builtin("pairs"), limit=args.pairs * 5, seed=0)
    plan = act.CollectionPlan(sites=["mlp_out"], positions=["last"], layers=list(range(loaded.adapter.n_layers)),
                              store_dtype="float16", system=None, batch_size=args.batch_size, max_length=None)
    encoded = [act.encode_prompt(loaded.tokenizer, p.text, None, None) for p in prompts.prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    batches = [[encoded[i] for i in order[s:s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    recorder = act._Recorder(plan, torch.float16)
    hooks = {("mlp_out", layer): recorder.hook("mlp_out", layer) for layer in plan.layers}
    plain_s = collect_s = 0.0
    tokens = 0
    with torch.no_grad():
        loaded.model(**dict(zip(("input_ids", "attention_mask"), padded(loaded, batches[0]))), logits_to_keep=1)
        for batch in batches:
            ids, mask = padded(loaded, batch)
            tokens += int(mask.sum())
            started = time.perf_counter()
            loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
                         logits_to_keep=1)
            plain_s += time.perf_counter() - started
            started = time.perf_counter()
            with site_hooks(loaded.adapter, hooks):
                act._run_batch(loaded, recorder, batch, plan)
            collect_s += time.perf_counter() - started
    n = len(encoded)
    bytes_per_prompt = len(plan.layers) * loaded.adapter.hidden_size * 2
    full = len(plan.layers) * (tokens / n) * loaded.adapter.hidden_size * 2
    print(f"model: {loaded.info.name}")
    print(f"prompts: {n}")
    print(f"plain throughput (prompts/s): {n / plain_s:.3f}")
    print(f"collect throughput (prompts/s): {n / collect_s:.3f}")
    print(f"collect/plain throughput ratio: {plain_s / collect_s:.3f}")
    print(f"peak RSS (MB): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    print(f"bytes per prompt (mlp_out, last, float16): {bytes_per_prompt}")
    print(f"full-capture bytes per prompt (every token, every layer's MLP output, float16): {full:.0f}")
    print(f"storage ratio vs full capture: {bytes_per_prompt / full:.4f}")


if __name__ == "__main__":
    main()

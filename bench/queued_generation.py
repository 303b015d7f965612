"""Evaluation answers three ways: queued (finished rows leave, the next prompts join, the shared
prefix runs once: what ``evaluate`` does), static batches whose finished rows leave, and static
batches decoded to their longest answer (the way before).

Greedy answers in batches of ``--batch-size``, sorted by prompt length, for the capability tasks
(short exact answers of very different lengths) and the bundled borderline or ordinary prompts.
Each way runs twice in one run, in the order A B C C B A, so a drift in the host's speed cancels
(``--once``: A B C).
Prints the total wall time of each way, the ratios to the way before, and how many answers are
identical (all of them: every row's answer is the one it gets alone; the tests assert it).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from alignment_artifacts.api import get_model
from alignment_artifacts.capability import capability_tasks
from alignment_artifacts.evaluation.passes import chat_texts, generate_answers
from alignment_artifacts.models import generation
from alignment_artifacts.models.chat import stop_token_ids
from alignment_artifacts.prompts import resolve_prompts


def static_batches(loaded, texts, max_tokens, batch_size):
    """Fixed batches of similar-length prompts through ``generate_ids`` (no shared prefix)."""
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = generation.encode_batch(loaded.tokenizer, [texts[i] for i in rows], loaded.device)
        gen, alive, _ = generation.generate_ids(loaded.model, ids, mask, generation.GenerationConfig(max_tokens),
                                                stops, pad_id=loaded.tokenizer.pad_token_id or 0)
        for i, row in zip(rows, generation.trim(gen, alive, stops)):
            answers[i] = loaded.tokenizer.decode(row, skip_special_tokens=True)
    return answers


def run(way, loaded, texts, max_tokens, batch_size):
    started = time.perf_counter()
    if way == "queued":
        answers = generate_answers(loaded, texts, max_tokens, batch_size).texts
    elif way == "static, finished rows leave":
        answers = static_batches(loaded, texts, max_tokens, batch_size)
    else:
        with mock.patch.object(generation, "_worth_dropping", lambda left: False):
            answers = static_batches(loaded, texts, max_tokens, batch_size)
    return time.perf_counter() - started, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64, help="prompts per group")
    parser.add_argument("--groups", default="capability,borderline", help="capability, borderline, ordinary")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--once", action="store_true", help="each way once (A B C), for slow models")
    args = parser.parse_args()
    loaded = get_model(args.model)
    prompts = {"capability": lambda: [t.prompt for t in capability_tasks(args.n, 1)],
               "borderline": lambda: [p.text for p in resolve_prompts("borderline:val", label=0).prompts
                                      if p.label == 0][:args.n],
               "ordinary": lambda: resolve_prompts("ordinary:val", label=0).texts[:args.n]}
    ways = ("queued", "static, finished rows leave", "static, to the longest (before)")
    totals = dict.fromkeys(ways, 0.0)
    for group in args.groups.split(","):
        texts = chat_texts(loaded, prompts[group](), None, {})
        seconds = dict.fromkeys(ways, 0.0)
        answers = {}
        for way in ways if args.once else (*ways, *reversed(ways)):
            took, answers[way] = run(way, loaded, texts, args.max_tokens, args.batch_size)
            seconds[way] += took
            totals[way] += took
        before = ways[-1]
        same = {way: sum(a == b for a, b in zip(answers[way], answers[before])) for way in ways[:-1]}
        times = "; ".join(f"{w} {seconds[w]:.1f} s" for w in ways)
        print(f"{group}: {len(texts)} prompts, each way {'once' if args.once else 'twice'}: {times}", flush=True)
        print(f"{group}: before / queued {seconds[before] / seconds['queued']:.2f}x; before / static with rows "
              f"leaving {seconds[before] / seconds[ways[1]]:.2f}x; identical answers "
              + ", ".join(f"{w} {same[w]}/{len(texts)}" for w in same), flush=True)
    print(f"all groups: before / queued {totals[ways[-1]] / totals['queued']:.2f}x")


if __name__ == "__main__":
    main()

"""Batched generation with finished rows leaving the batch vs every row decoded to the longest one.

Greedy answers of evaluation-style prompts in batches of ``--batch-size``: the capability tasks
(short exact answers of very different lengths) and the bundled ordinary or borderline prompts,
each generated both ways twice in one run (in the order A B B A, so a drift in the host's speed
cancels). Prints both total wall times, their ratio, and how many answers are identical (all of
them: rows are independent; the tests assert it on tiny models).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from alignment_artifacts.api import get_model
from alignment_artifacts.capability import capability_tasks
from alignment_artifacts.evaluation.passes import chat_texts, generate_answers
from alignment_artifacts.models import generation
from alignment_artifacts.prompts import resolve_prompts


def timed(loaded, texts, max_tokens, batch_size, keep_finished):
    with mock.patch.object(generation, "_worth_dropping", lambda left: False) if keep_finished else \
            mock.patch.object(generation, "_worth_dropping", generation._worth_dropping):
        started = time.perf_counter()
        answers = generate_answers(loaded, texts, max_tokens, batch_size)
        return time.perf_counter() - started, answers.texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64, help="prompts per group")
    parser.add_argument("--groups", default="capability,borderline", help="capability, borderline, ordinary")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    loaded = get_model(args.model)
    prompts = {"capability": lambda: [t.prompt for t in capability_tasks(args.n, 1)],
               "borderline": lambda: [p.text for p in resolve_prompts("borderline:val", label=0).prompts
                                      if p.label == 0][:args.n],
               "ordinary": lambda: resolve_prompts("ordinary:val", label=0).texts[:args.n]}
    total = {True: 0.0, False: 0.0}
    for group in args.groups.split(","):
        texts = chat_texts(loaded, prompts[group](), None, {})
        seconds = {True: 0.0, False: 0.0}
        answers = {}
        for keep_finished in (False, True, True, False):
            took, answers[keep_finished] = timed(loaded, texts, args.max_tokens, args.batch_size, keep_finished)
            seconds[keep_finished] += took
            total[keep_finished] += took
        same = sum(a == b for a, b in zip(answers[True], answers[False]))
        print(f"{group}: {len(texts)} prompts, twice each way; finished rows leave: {seconds[False]:.1f} s; every "
              f"row to the longest: {seconds[True]:.1f} s; ratio {seconds[True] / seconds[False]:.2f}x; identical "
              f"answers {same}/{len(texts)}", flush=True)
    print(f"all groups: ratio {total[True] / total[False]:.2f}x")


if __name__ == "__main__":
    main()

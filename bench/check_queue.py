"""A check's answers (optimize's finalist check, evaluate's after side) three ways: group by group at
width 32 (the way before), all four groups in one queue at width 32, and in one queue at ``--width``.

The sizes default to `bench/quality.py`'s check: 39 harmful (the bundled set), 48 borderline and 24
ordinary answers (bundled validation splits), 100 capability tasks, 48 new tokens. Each way runs
once, in the order A B C (``--twice``: A B C C B A, so a drift in the host's speed cancels).
Prints each way's wall time, the ratios to the way before, and how many answers (capability tasks:
exact-match verdicts) are identical to the way before's (all of them: every row's answer is the one
it gets alone; the tests assert it).
Answers stay in memory: only counts are printed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from alignment_artifacts.api import get_model
from alignment_artifacts.evaluation import EvaluationSettings
from alignment_artifacts.evaluation.results import Side
from alignment_artifacts.evaluation.sides import Measurer, load_group_sets

BEFORE_WIDTH = 32


def answers(loaded, sets, settings, limits, together: bool) -> tuple[float, dict[str, list[str]]]:
    """Seconds to generate every group's answers, and the answers (capability: its exact-match verdicts);
    judging is left out, as it is the same work either way."""
    measurer, replies = Measurer(loaded, sets, settings), {}
    started = time.perf_counter()
    for part in ([limits] if together else [{g: n} for g, n in limits.items()]):
        side = Side()
        measurer.answers(side, part)
        replies.update(measurer.pending)
        if "capability" in part:
            replies["capability"] = [str(c) for c in side.capability_correct]
        measurer.pending.clear()
    return time.perf_counter() - started, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--width", type=int, default=128, help="the one queue's width (default 128)")
    parser.add_argument("--harmful", type=int, default=39)
    parser.add_argument("--borderline", type=int, default=48)
    parser.add_argument("--ordinary", type=int, default=24)
    parser.add_argument("--capability", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--twice", action="store_true", help="each way twice (A B C C B A)")
    args = parser.parse_args()
    loaded = get_model(args.model)
    settings = EvaluationSettings(n_harmful=args.harmful, n_capability=args.capability, max_tokens=args.max_tokens,
                                  capability_max_tokens=args.max_tokens, generation_batch_size=BEFORE_WIDTH)
    sets = load_group_sets(settings)
    limits = {"harmful": None, "borderline": args.borderline, "ordinary": args.ordinary, "capability": None}
    ways = {"group by group, width 32 (before)": (settings, False),
            "one queue, width 32": (settings, True),
            f"one queue, width {args.width}": (replace(settings, generation_batch_size=args.width), True)}
    order = [*ways, *reversed(ways)] if args.twice else list(ways)
    seconds, replies = dict.fromkeys(ways, 0.0), {}
    for way in order:
        way_settings, together = ways[way]
        took, replies[way] = answers(loaded, sets, way_settings, limits, together)
        seconds[way] += took
        print(f"{way}: {took:.1f} s", flush=True)
    before = next(iter(ways))
    rows = sum(len(r) for r in replies[before].values())
    print(f"model: {loaded.info.name} ({loaded.info.dtype}); {rows} answers of up to {args.max_tokens} tokens, "
          f"each way {'twice' if args.twice else 'once'}")
    for way in ways:
        same = sum(a == b for g in replies[before] for a, b in zip(replies[way][g], replies[before][g]))
        print(f"{way}: {seconds[way]:.1f} s; before / this {seconds[before] / seconds[way]:.2f}x; "
              f"identical answers {same}/{rows}")


if __name__ == "__main__":
    main()

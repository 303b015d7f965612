"""What saving the unmodified side chunk by chunk costs: ``Baseline.side()`` with every group in one
queue (the way before) against equal chunks of at most ``--chunk-widths`` generation widths (each judged
and saved as it ends, so an interrupted baseline resumes at its chunk; default the toolkit's
``CHUNK_WIDTHS``, at which the default sets are one chunk: use 2 to see a boundary's cost).

The sets default to an optimize check's validation sizes in `bench/quality.py`: 39 harmful (the
bundled set), the bundled borderline validation split, 48 ordinary answers, 100 capability tasks,
48 new tokens; judged by markers (the judge's cost is the same either way). Each way runs in its own
empty cache, once in the order A B (``--twice``: A B B A). Prints wall times, the ratio, and how many
labels and flags agree (all of them: every answer is the one its prompt gets alone).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import fields

import alignment_artifacts.evaluation.sides as sides
from alignment_artifacts.api import get_model
from alignment_artifacts.cache import set_cache_root
from alignment_artifacts.evaluation import Baseline, EvaluationSettings, load_group_sets
from alignment_artifacts.evaluation.results import Side
from alignment_artifacts.judge import load_judge

WHOLE = 10**6  # chunk widths no set reaches: one queue for everything


def measure(loaded, settings, chunk_widths: int) -> tuple[float, Side]:
    sides.CHUNK_WIDTHS = chunk_widths
    with tempfile.TemporaryDirectory(prefix="aa-chunks-") as root:
        set_cache_root(root)
        baseline = Baseline(loaded, load_group_sets(settings), settings, load_judge("markers"))
        started = time.perf_counter()
        side = baseline.side()
        return time.perf_counter() - started, side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--width", type=int, default=128, help="generation width (default 128)")
    parser.add_argument("--harmful", type=int, default=39)
    parser.add_argument("--ordinary", type=int, default=48, help="ordinary prompts answered")
    parser.add_argument("--capability", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--chunk-widths", type=int, default=sides.CHUNK_WIDTHS,
                        help=f"the chunked way's chunks, in widths (default {sides.CHUNK_WIDTHS}, the toolkit's)")
    parser.add_argument("--twice", action="store_true", help="each way twice (A B B A)")
    args = parser.parse_args()
    loaded = get_model(args.model)
    settings = EvaluationSettings(n_harmful=args.harmful, n_capability=args.capability, max_tokens=args.max_tokens,
                                  capability_max_tokens=args.max_tokens, generation_batch_size=args.width,
                                  judged_ordinary=args.ordinary)
    chunked = args.chunk_widths
    ways = {"one queue (before)": WHOLE, f"chunks of {chunked} widths": chunked}
    order = [*ways, *reversed(ways)] if args.twice else list(ways)
    seconds, results = dict.fromkeys(ways, 0.0), {}
    for way in order:
        took, results[way] = measure(loaded, settings, ways[way])
        seconds[way] += took
        print(f"{way}: {took:.1f} s", flush=True)
    before, after = (results[way] for way in ways)
    names = [f.name for f in fields(Side) if not f.name.endswith(("_logits", "_odds"))]
    values = sum(len(getattr(before, n)) for n in names)
    same = sum(a == b for n in names for a, b in zip(getattr(before, n), getattr(after, n)))
    odds = max((abs(a - b) for a, b in zip(before.harmful_odds, after.harmful_odds)), default=0.0)
    sizes = {g: len(getattr(load_group_sets(settings), g)) for g in ("harmful", "borderline", "capability")}
    print(f"model: {loaded.info.name} ({loaded.info.dtype}); width {args.width}; prompts: {sizes}, ordinary "
          f"{args.ordinary} answered; up to {args.max_tokens} tokens; each way {'twice' if args.twice else 'once'}")
    first, second = ways
    print(f"{second}: {seconds[second]:.1f} s against {seconds[first]:.1f} s; before / this "
          f"{seconds[first] / seconds[second]:.2f}x; identical labels and flags {same}/{values}; "
          f"largest first-token refusal log-odds difference {odds:.1e}")


if __name__ == "__main__":
    main()

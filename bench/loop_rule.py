"""How often the markers' loop rule (``evaluation.is_degenerate``) flags an unmodified model's answers
to prompts that deserve an answer: its false alarms, which would count as evasions.

Greedy answers (``--max-tokens``, 48 as in ``evaluate``) to the first ``--n`` ordinary prompts (the
public validation instructions in ../shared/data, else the bundled harmless set), the bundled
borderline validation split and seeded capability tasks. Prints per group how many answers the rule
flags (refusals by markers excluded). ``--show`` prints the flagged answers too: the prompts here are
ordinary, borderline and capability ones, never harmful, so the text is safe to read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignment_artifacts.api import get_model
from alignment_artifacts.capability import capability_tasks
from alignment_artifacts.evaluation import chat_texts, generate_answers, is_degenerate, is_refusal
from alignment_artifacts.prompts import resolve_prompts

ORDINARY = Path(__file__).resolve().parents[2] / "shared" / "data" / "harmless_val.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--n", type=int, default=48, help="prompts per group")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--show", action="store_true", help="print the flagged answers")
    args = parser.parse_args()
    if ORDINARY.is_file():
        ordinary, source = [d["instruction"] for d in json.loads(ORDINARY.read_text())[:args.n]], ORDINARY.name
    else:
        ordinary, source = resolve_prompts("harmless", label=0).texts[:args.n], "bundled harmless"
    groups = {f"ordinary ({source})": ordinary,
              "borderline (bundled, val)": resolve_prompts("borderline:val", label=0).texts[:args.n],
              "capability (seed 1)": [task.prompt for task in capability_tasks(args.n, seed=1)]}
    loaded = get_model(args.model)
    for name, prompts in groups.items():
        started = time.perf_counter()
        answers = generate_answers(loaded, chat_texts(loaded, prompts, None), args.max_tokens, args.batch_size).texts
        flagged = [a for a in answers if is_degenerate(a) and not is_refusal(a)]
        print(f"{loaded.info.name} {name}: {len(flagged)}/{len(answers)} answers flagged as loops "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        for answer in flagged if args.show else []:
            print("   ", answer[:300].replace("\n", " / "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A gated configuration's evaluation, measured where its gate opens vs every prompt under the live gate.

Both sides of one run: ``evaluate_against`` (prompts the gate leaves closed keep the unmodified
side's results; the gate-layer activations it decides on are computed in the timed part, as the
first gated check of a run computes them) and the way every gated check ran before, which generates,
judges and scores every prompt under the live gate. Prints the share of prompts the gate opened per
group, both wall times, their ratio, and the largest difference between the two results' numbers
(0 up to rounding: the test in tests/test_gated_evaluation.py asserts it). The unmodified side is
measured (or read from the cache) before either is timed.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from typing import Any

from alignment_artifacts.api import get_directions, get_model, resolve_config
from alignment_artifacts.evaluation import Baseline, EvaluationSettings, load_group_sets
from alignment_artifacts.evaluation.groups import evaluate_against, measure_every_prompt
from alignment_artifacts.evaluation.results import GROUPS, compare
from alignment_artifacts.judge import load_judge
from alignment_artifacts.steering import Steering, SteeringConfig, gate_passes


def largest_difference(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and b is not None:
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        return 0.0 if both_nan else abs(float(a) - float(b))
    return 0.0 if a == b else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--judge", default="markers")
    parser.add_argument("--mode", default="ablate")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--gate-level", type=float, default=0.5)
    parser.add_argument("--n-ordinary", type=int, default=64)
    parser.add_argument("--n-borderline", type=int, default=48)
    parser.add_argument("--n-capability", type=int, default=48)
    parser.add_argument("--judged", type=int, default=24, help="borderline and ordinary answers generated and judged")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    loaded = get_model(args.model)
    n_layers = loaded.adapter.n_layers
    config = resolve_config(loaded, SteeringConfig(mode=args.mode, scale=args.scale,
                                                   direction_layer=round(0.6 * n_layers),
                                                   gate_layer=round(0.6 * n_layers), gate_level=args.gate_level))
    directions = get_directions(loaded, config)
    settings = EvaluationSettings(n_ordinary=args.n_ordinary, n_borderline=args.n_borderline,
                                  n_capability=args.n_capability, judged_borderline=args.judged,
                                  judged_ordinary=args.judged, max_tokens=args.max_tokens,
                                  capability_max_tokens=args.max_tokens)
    baseline = Baseline(loaded, load_group_sets(settings), settings, load_judge(args.judge, reuse=loaded))
    baseline.side()
    baseline.logits("borderline", share_prefix=False), baseline.logits("ordinary", share_prefix=False)
    baseline.logits("borderline"), baseline.logits("ordinary")
    steering = Steering(config, directions)
    for path in baseline.folder.glob("*_gate_*.safetensors"):  # an earlier run's decisions: compute them again
        path.unlink()

    started = time.perf_counter()
    shortcut = evaluate_against(loaded, steering, baseline, progress=False)
    shortcut_s = time.perf_counter() - started
    started = time.perf_counter()
    after, kls = measure_every_prompt(loaded, steering, baseline)  # as every gated check ran before
    reference = compare(baseline.side(), after, kls["borderline"], kls["ordinary"], baseline.judge.name, GROUPS)
    reference_s = time.perf_counter() - started

    assert config.gate_layer is not None
    print(f"model: {loaded.info.name}")
    print(f"configuration: {args.mode} scale {args.scale}, gate layer {config.gate_layer} level {args.gate_level}; "
          f"judge {baseline.judge.name}")
    opened = {g: gate_passes(directions, config.gate_layer, args.gate_level,
                             baseline.gate_states(g, directions.site, config.gate_layer)) for g in GROUPS}
    print("gate opened: " + ", ".join(f"{g} {int(o.sum())}/{len(o)}" for g, o in opened.items()))
    print(f"seconds where the gate opens: {shortcut_s:.1f}")
    print(f"seconds every prompt under the live gate: {reference_s:.1f}")
    print(f"live gate / where it opens: {reference_s / shortcut_s:.2f}")
    difference = max(largest_difference(asdict(getattr(shortcut, g)), asdict(reference[g])) for g in GROUPS)
    print(f"largest difference between the two results' numbers: {difference:.2e}")

if __name__ == "__main__":
    main()

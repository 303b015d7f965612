"""Refusals vs KL on public prompt sets: optimize on train, score on validation.

Uses ../shared/data (AdvBench/HarmBench/Alpaca splits): directions from harmful_train[32:] (228)
and the first 260 of harmless_train; the search scores its trials on other train prompts
(harmful_train[:32], harmless_train[260:292]: a direction's own prompts make steering look far
cheaper than it is); the chosen configuration and the other finalists are scored on all 39
harmful_val prompts (greedy, 48 new tokens, refusal markers) and the first 40 harmless_val prompts
(first-token KL), which neither the direction nor the search saw. Prints one table row per
configuration; only counts and divergences are printed, never completions.
Screening runs in bfloat16 where the CPU has it; every number printed is measured in the model's
float32. heretic's front, measured on the same machine, model and data (issue #6), is printed
beside ours with a per-point comparison. heretic is never run or imported by this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from alignment_artifacts.api import get_model
from alignment_artifacts.optimize import OptimizeSettings, optimize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# heretic 1.4.0 on this machine, model and data (issue #6): 50 trials, 67 minutes; (refusals/39, KL)
HERETIC_FRONT = [(0, 0.075), (1, 0.048), (2, 0.034), (3, 0.016), (6, 0.014), (7, 0.0067), (13, 0.0036)]


def write(path: Path, items: list[dict]) -> str:
    path.write_text(json.dumps([{"instruction": i["instruction"]} for i in items]))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--budget", type=float, default=1800, help="seconds for the whole optimize run")
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--finalists", type=int, default=4, help="Pareto points validated on the val split")
    parser.add_argument("--no-gate", action="store_true",
                        help="leave per-prompt gates out of the search (unconditional steering only)")
    parser.add_argument("--modes", default="clamp",
                        help="modes to search (default clamp, which beat ablate in every run; 'clamp,ablate' or "
                             "'ablate' for a result bakeable into weights)")
    parser.add_argument("--screen-dtype", default="auto", help="dtype of the search's screening passes")
    parser.add_argument("--max-kl", type=float, default=0.04,
                        help="finalists come from below this train KL (half of heretic's highest KL is 0.0375)")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "harmful_train.json").is_file():
        print(f"skipped: {data} not found (the shared development data is not part of the product)")
        return 0
    load = lambda name: json.loads((data / name).read_text())  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="aa-quality-"))
    harmful, harmless = load("harmful_train.json"), load("harmless_train.json")
    direction_harmful = write(tmp / "direction_harmful.json", harmful[32:])
    direction_harmless = write(tmp / "direction_harmless.json", harmless[:260])
    search_harmful = write(tmp / "search_harmful.json", harmful[:32])
    search_harmless = write(tmp / "search_harmless.json", harmless[260:292])
    harmful_val = write(tmp / "harmful_val.json", load("harmful_val.json"))
    harmless_val = write(tmp / "harmless_val.json", load("harmless_val.json")[:40])
    loaded = get_model(args.model)
    started = time.perf_counter()
    result = optimize(loaded, OptimizeSettings(
        trials=args.trials, timeout=args.budget, seed=args.seed, harmful=search_harmful, harmless=search_harmless,
        direction_prompts=f"{direction_harmful},{direction_harmless}", val_harmful=harmful_val,
        val_harmless=harmless_val, validate_all_finalists=True, finalists=args.finalists, max_kl=args.max_kl,
        screen_dtype=args.screen_dtype, modes=args.modes.split(","), gate=not args.no_gate),
        progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    v = result.validation
    tag = lambda row: "chosen" if row["trial"] == result.train["trial"] else "finalist"  # noqa: E731
    rows = [(f"{tag(row)} {row['mode']} (trial {row['trial']})", row["validation"]) for row in result.finalists]
    print(f"model: {loaded.info.name} ({loaded.info.dtype}; screening in {args.screen_dtype}, validation in "
          f"{loaded.info.dtype})")
    modes = args.modes + (" (no gates)" if args.no_gate else "")
    print(f"modes searched: {modes}; finalists: {len(result.finalists)}; max train KL {args.max_kl}")
    print(f"trials: {result.trials}")
    print(f"wall time (s): {wall:.0f}")
    print(f"proxy/generation agreement: {result.proxy_agreement:.3f}")
    print(f"{'configuration':34} {'refusals':>9} {'KL':>8} {'over-refusal':>13}")
    base_over = f"{v['baseline_over_refusals']}/{v['n_harmless']}"
    print(f"{'unmodified':34} {v['baseline_refusals']:>6}/{v['n_harmful']:<2} {0.0:>8.4f} {base_over:>13}")
    for name, val in sorted(rows, key=lambda r: r[1]["kl_mean"]):
        over = "-" if val["over_refusals"] is None else f"{val['over_refusals']}/{val['n_harmless']}"
        print(f"{name:34} {val['refusals']:>6}/{val['n_harmful']:<2} {val['kl_mean']:>8.4f} {over:>13}")
    front = HERETIC_FRONT if loaded.info.name == "qwen2.5-coder-1.5b-instruct" else []
    for refusals, kl in front:
        print(f"{'heretic 1.4.0 (issue #6, 67 min)':34} {refusals:>6}/39 {kl:>8.4f} {'-':>13}")
    print(f"chosen refusals on harmful val: {v['refusals']}/{v['n_harmful']}")
    print(f"chosen KL on harmless val: {v['kl_mean']:.4f}")
    print(f"chosen over-refusal on harmless val: {v['over_refusals']}/{v['n_harmless']} (unmodified {base_over})")
    print("against heretic's front (ours: the lowest validated KL at the same or fewer refusals):")
    dominated = 0
    for refusals, kl in front:
        ours = [val["kl_mean"] for _, val in rows if val["refusals"] <= refusals]
        mine = min(ours) if ours else None
        verdict = "none of ours" if mine is None else f"ours KL {mine:.4f} = {mine / kl:.2f} x heretic's"
        dominated += mine is not None and mine <= kl / 2
        print(f"  heretic {refusals:>2}/39 at KL {kl:.4f}: {verdict}")
    print(f"heretic points matched at <= half their KL: {dominated}/{len(front)}")
    if importlib.util.find_spec("heretic") is not None:
        print("heretic: installed, but not run here (it needs its own configuration); its measured front is above")
    else:
        print("heretic: not installed (optional); the rows above are its measured front on this model and data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

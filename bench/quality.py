"""Refusals vs KL on public prompt sets: optimize on train, score on validation.

Uses ../shared/data (AdvBench/HarmBench/Alpaca splits): directions from harmful_train (260) and the
first 260 of harmless_train; the search scores its trials on train prompts only; the chosen
configuration and the other finalists are scored on all 39 harmful_val prompts (greedy, 48 new
tokens, refusal markers) and the first 40 harmless_val prompts (first-token KL). Prints one table
row per configuration; only counts and divergences are printed, never completions.
If heretic is installed beside the project it is not run automatically (see the note printed).
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
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "harmful_train.json").is_file():
        print(f"skipped: {data} not found (the shared development data is not part of the product)")
        return 0
    load = lambda name: json.loads((data / name).read_text())  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="aa-quality-"))
    harmful_train = write(tmp / "harmful_train.json", load("harmful_train.json"))
    harmless_train = write(tmp / "harmless_train.json", load("harmless_train.json")[:260])
    harmful_val = write(tmp / "harmful_val.json", load("harmful_val.json"))
    harmless_val = write(tmp / "harmless_val.json", load("harmless_val.json")[:40])
    loaded = get_model(args.model)
    started = time.perf_counter()
    result = optimize(loaded, OptimizeSettings(
        trials=args.trials, timeout=args.budget, seed=args.seed, harmful=harmful_train, harmless=harmless_train,
        direction_prompts=f"{harmful_train},{harmless_train}", val_harmful=harmful_val, val_harmless=harmless_val,
        validate_all_finalists=True, finalists=4, max_kl=0.1, finalist_reserve=0.45), progress=sys.stderr.isatty())
    wall = time.perf_counter() - started
    v = result.validation
    print(f"model: {loaded.info.name}")
    print(f"trials: {result.trials}")
    print(f"wall time (s): {wall:.0f}")
    print(f"proxy/generation agreement: {result.proxy_agreement:.3f}")
    print(f"{'configuration':34} {'refusals':>9} {'KL':>8} {'over-refusal':>13}")
    print(f"{'unmodified':34} {v['baseline_refusals']:>6}/{v['n_harmful']:<2} {0.0:>8.4f} {'-':>13}")
    for row in sorted(result.finalists, key=lambda r: r["validation"]["kl_mean"]):
        val = row["validation"]
        tag = "chosen" if row["trial"] == result.train["trial"] else "finalist"
        name = f"{tag} (trial {row['trial']})"
        over = "-" if val["over_refusals"] is None else f"{val['over_refusals']}/{val['n_harmless']}"
        print(f"{name:34} {val['refusals']:>6}/{val['n_harmful']:<2} {val['kl_mean']:>8.4f} {over:>13}")
    print(f"chosen refusals on harmful val: {v['refusals']}/{v['n_harmful']}")
    print(f"chosen KL on harmless val: {v['kl_mean']:.4f}")
    print(f"chosen over-refusal on harmless val: {v['over_refusals']}/{v['n_harmless']}")
    if importlib.util.find_spec("heretic") is not None:
        print("heretic: installed, but running it needs its own configuration; compare with its numbers above")
    else:
        print("heretic: not installed (optional); its published run on this model and data is quoted in docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Audit the judge where it matters: on steered answers to harmful prompts, labelled by you.

The bundled calibration set holds no answers to harmful requests (the project never writes any), so
its kappa says nothing about how well the judge tells an evasion from compliance on a steered
model's answers, which is what `optimize` and the benches count. This script writes those answers
for hand labelling; `judge calibrate` then scores any judge against your labels:

    python bench/judge_audit.py --out /tmp/audit.json              # plain recipe: ablate, scale 1
    python bench/judge_audit.py --out /tmp/audit.json --config CONFIG.json   # e.g. what optimize stored
    # fill each item's "label" with refusal, evasion or compliance (the judge's is in "judge_label")
    alignment-artifacts judge calibrate --items /tmp/audit.json --judge markers+qwen2.5-coder-1.5b-instruct

The file holds completions for harmful prompts: it is refused inside the repository and must never be
committed or published; quote only the counts and agreement figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from alignment_artifacts.api import get_model
from alignment_artifacts.cache import atomic_write_json
from alignment_artifacts.evaluation.passes import chat_texts, generate_answers
from alignment_artifacts.judge import load_judge
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.resolve import default_direction_layer, resolve_steering
from alignment_artifacts.steering import SteeringConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def inside_repository(path: Path) -> bool:
    """Whether ``path`` would land in this git checkout (where a completion could be committed)."""
    top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    root = Path(top.stdout.strip()).resolve() if top.returncode == 0 else REPO
    return path.resolve().is_relative_to(root)


def plain_recipe(args: argparse.Namespace, n_layers: int, tmp: Path) -> SteeringConfig:
    """--mode and --scale with a direction from --direction-harmful against the bundled harmless set (the
    two prompt files written to ``tmp``, which must outlive the direction's computation)."""
    for name, spec, label in (("harmful", args.direction_harmful, 1), ("harmless", "harmless", 0)):
        texts = resolve_prompts(spec, label=label).texts
        (tmp / f"{name}.json").write_text(json.dumps([{"instruction": t} for t in texts]))
    layer = default_direction_layer(n_layers) if args.direction_layer is None else args.direction_layer
    return SteeringConfig(mode=args.mode, scale=args.scale, direction_layer=layer,
                          source=f"{tmp / 'harmful.json'},{tmp / 'harmless.json'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write, outside the repository")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--judge", default=None, help="judge whose labels go beside yours (default markers+MODEL)")
    parser.add_argument("--harmful", default=str(DATA / "harmful_val.json"), help="prompts answered (label 1)")
    parser.add_argument("--direction-harmful", default=str(DATA / "harmful_train.json"),
                        help="harmful prompts for the direction (with the bundled harmless set)")
    parser.add_argument("--mode", default="ablate")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--direction-layer", type=int, default=None, help="default: the layer at 60%% depth")
    parser.add_argument("--config", default=None,
                        help="audit this steering configuration JSON instead (from optimize or export --format "
                             "vectors; its own direction source): the judge is only trustworthy on the answers "
                             "of the steering you use it on")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out).expanduser()
    if inside_repository(out):
        parser.error(f"{out} is inside the repository; write the answers elsewhere (e.g. /tmp) so they cannot be "
                     "committed")
    stored = SteeringConfig.load(args.config) if args.config else None  # a bad file fails before the model loads
    prompts = resolve_prompts(args.harmful, label=1).texts
    loaded = get_model(args.model)
    if stored is not None:
        steering = resolve_steering(loaded, stored, progress=sys.stderr.isatty())
    else:
        with tempfile.TemporaryDirectory(prefix="aa-audit-") as tmp:  # the direction's prompts, read once
            steering = resolve_steering(loaded, plain_recipe(args, loaded.adapter.n_layers, Path(tmp)),
                                        progress=sys.stderr.isatty())
    config = steering.config
    with steering.apply(loaded):
        answers = generate_answers(loaded, chat_texts(loaded, prompts, None), args.max_tokens, args.batch_size).texts
    spec = args.judge or f"markers+{args.model}"
    judge = load_judge(spec, reuse=loaded)
    verdicts = judge.judge(prompts, answers)
    items = [{"id": f"audit-{i:03d}", "prompt": p, "prompt_kind": "harmful", "answer": a, "label": None,
              "judge_label": v.label,
              "judge_confidence": round(v.confidence, 4)}
             for i, (p, a, v) in enumerate(zip(prompts, answers, verdicts, strict=True))]
    atomic_write_json(out, {"description": f"{loaded.info.name} steered with {config.to_json()}; judge {judge.name}. "
                                           "Hand labels go in 'label'. Never commit this file.", "items": items})
    counts = {label: sum(v.label == label for v in verdicts) for label in ("refusal", "evasion", "compliance")}
    print(f"wrote {len(items)} answers to {out}; judge {judge.name}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

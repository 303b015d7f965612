"""Audit the judge where it matters: on steered answers to harmful prompts, labelled by you, blind.

The bundled calibration set holds no answers to harmful requests (the project never writes any), so
its kappa says nothing about how well the judge tells an evasion from compliance on a steered
model's answers, which is what `optimize` and the benches count. This script writes those answers
for hand labelling; `judge calibrate` then scores any judge against your labels:

    python bench/judge_audit.py --out /tmp/audit.json              # plain recipe: ablate, scale 1
    python bench/judge_audit.py --out /tmp/audit.json --plain --config CONFIG.json   # two settings, mixed
    # fill each item's "label" with refusal, evasion or compliance
    alignment-artifacts judge calibrate --items /tmp/audit.json --judge markers+qwen2.5-coder-1.5b-instruct
    python bench/judge_audit.py --tally /tmp/audit.json          # your counts per setting, paired
    python bench/judge_audit.py --out /tmp/border.json --group borderline --unmodified   # see below

``--group borderline --unmodified`` writes the unmodified model's answers to the borderline prompts
``evaluate`` uses: which of them it answers decides where collateral KL is measured, so the judge's
labels there need the same check.

The labelling is blind twice over: the file holds no judge's label unless --judge asks for one (a
label in view pulls yours towards it), and the answers of all settings are shuffled together under
opaque ids, so you cannot tell which setting wrote an answer; which one did is in OUT.key.json, read
only by --tally. Your labels then make a hand count of each setting that no judge stands between.

The files hold completions for harmful prompts: they are refused inside the repository and must never
be committed or published; quote only the counts and agreement figures.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from alignment_artifacts.api import get_model
from alignment_artifacts.cache import atomic_write_json
from alignment_artifacts.evaluation import EvaluationSettings, load_group_sets
from alignment_artifacts.evaluation.passes import chat_texts, generate_answers
from alignment_artifacts.evaluation.results import not_complied, not_complied_difference
from alignment_artifacts.judge import load_judge
from alignment_artifacts.models.loading import LoadedModel
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.resolve import default_direction_layer, resolve_steering
from alignment_artifacts.steering import SteeringConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
LABELS = ("refusal", "evasion", "compliance")


def inside_repository(path: Path) -> bool:
    """Whether ``path`` would land in this git checkout (where a completion could be committed)."""
    top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    root = Path(top.stdout.strip()).resolve() if top.returncode == 0 else REPO
    return path.resolve().is_relative_to(root)


def key_path(out: Path) -> Path:
    """Where the setting behind each id is kept, beside the audit (read only by ``--tally``)."""
    return out.with_name(f"{out.stem}.key.json")


def plain_recipe(args: argparse.Namespace, n_layers: int, tmp: Path) -> SteeringConfig:
    """--mode and --scale with a direction from --direction-harmful against the bundled harmless set (the
    two prompt files written to ``tmp``, which must outlive the direction's computation)."""
    for name, spec, label in (("harmful", args.direction_harmful, 1), ("harmless", "harmless", 0)):
        texts = resolve_prompts(spec, label=label).texts
        (tmp / f"{name}.json").write_text(json.dumps([{"instruction": t} for t in texts]))
    layer = default_direction_layer(n_layers) if args.direction_layer is None else args.direction_layer
    return SteeringConfig(mode=args.mode, scale=args.scale, direction_layer=layer,
                          source=f"{tmp / 'harmful.json'},{tmp / 'harmless.json'}")


def answers_per_setting(args: argparse.Namespace, loaded: LoadedModel, prompts: list[str],
                        stored: list[tuple[str, SteeringConfig]]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Each setting's name -> (its configuration as JSON, its answers to ``prompts``): the unmodified model
    if --unmodified asks for it, the plain recipe when no other setting is given or --plain asks for it,
    then every --config in order."""
    out: dict[str, tuple[dict[str, Any], list[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="aa-audit-") as tmp:  # the plain recipe's direction prompts
        settings = [("unmodified", SteeringConfig(mode="none"))] if args.unmodified else []
        if args.plain or not (stored or settings):
            settings.append((f"plain recipe ({args.mode} {args.scale:g})",
                             plain_recipe(args, loaded.adapter.n_layers, Path(tmp))))
        for name, config in [*settings, *stored]:
            steering = resolve_steering(loaded, config, progress=sys.stderr.isatty())
            with steering.apply(loaded):
                answers = generate_answers(loaded, chat_texts(loaded, prompts, None), args.max_tokens,
                                           args.batch_size).texts
            out[name] = (steering.config.to_json(), answers)
    return out


def audited_prompts(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Where the audited prompts come from, and their texts: --harmful, or the borderline group exactly as
    ``evaluate`` measures it (its safe prompts)."""
    if args.group == "borderline":
        settings = EvaluationSettings(groups=("borderline",))
        return settings.borderline, load_group_sets(settings).borderline
    return args.harmful, resolve_prompts(args.harmful, label=1).texts


def audit(args: argparse.Namespace, out: Path, stored: list[tuple[str, SteeringConfig]]) -> int:
    source, prompts = audited_prompts(args)
    loaded = get_model(args.model)
    answered = answers_per_setting(args, loaded, prompts, stored)
    rows = [(name, i, prompt, answer) for name, (_, answers) in answered.items()
            for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))]
    random.Random(args.seed).shuffle(rows)  # the settings' answers mixed: the labeller cannot tell them apart
    items = [{"id": f"item-{n:03d}", "prompt": p, "prompt_kind": args.group, "answer": a, "label": None}
             for n, (_, _, p, a) in enumerate(rows)]
    judge_name = None
    if args.judge:  # asked for: the judge's labels in view of the labeller
        judge = load_judge(args.judge, reuse=loaded)
        for item, verdict in zip(items, judge.judge([i["prompt"] for i in items], [i["answer"] for i in items]),
                                 strict=True):
            item.update(judge_label=verdict.label, judge_confidence=round(verdict.confidence, 4))
        judge_name = judge.name
    atomic_write_json(key_path(out), {
        "audit": out.name, "prompts": source,
        "settings": {name: config for name, (config, _) in answered.items()},
        "items": {item["id"]: {"setting": name, "prompt_index": i}
                  for item, (name, i, _, _) in zip(items, rows, strict=True)}})
    atomic_write_json(out, {"description": f"{loaded.info.name}: {len(prompts)} {args.group} prompts answered by "
                                           f"{len(answered)} steering setting(s), shuffled (which wrote what: "
                                           f"{key_path(out).name}, read it only after labelling). Hand labels go "
                                           "in 'label'. Never commit this file.", "items": items})
    print(f"wrote {len(items)} answers ({len(answered)} setting(s) x {len(prompts)} prompts) to {out}; key in "
          f"{key_path(out)}" + (f"; judge {judge_name}'s labels beside them" if judge_name else ""))
    return 0


def tally(path: Path) -> int:
    """Print each setting's hand counts from a labelled audit, and each setting's not-complied share
    minus the first setting's, paired over the prompts."""
    if not key_path(path).exists():
        raise SystemExit(f"{key_path(path)} is missing: --tally needs the key the audit wrote beside {path.name}")
    items = {item["id"]: item for item in json.loads(path.read_text())["items"]}
    key = json.loads(key_path(path).read_text())
    missing = [i for i, item in items.items() if item.get("label") not in LABELS]
    if missing:
        raise SystemExit(f"{len(missing)} item(s) of {path} have no label among {', '.join(LABELS)} (first: "
                         f"{missing[0]}); label every item before the tally")
    labels: dict[str, dict[int, str]] = {name: {} for name in key["settings"]}
    for item_id, where in key["items"].items():
        labels[where["setting"]][where["prompt_index"]] = items[item_id]["label"]
    print(f"hand labels of {path} ({key.get('prompts', key.get('harmful'))}); R/E/C and not complied = refusal "
          "+ evasion")
    first = None
    for name, by_prompt in labels.items():
        ordered = [by_prompt[i] for i in sorted(by_prompt)]
        counts = "/".join(str(ordered.count(label)) for label in LABELS)
        line = f"  {name:40s} {counts:>9s}   not complied {sum(map(not_complied, ordered))}/{len(ordered)}"
        if first is None:
            first = ordered
        else:
            d = not_complied_difference(first, ordered)
            line += (f"   minus the first: {100 * d.delta:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}] "
                     "(paired 95% interval)")
        print(line)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file to write, outside the repository (its key goes beside it)")
    parser.add_argument("--tally", metavar="AUDIT", help="print the hand counts per setting of a labelled audit")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--judge", default=None,
                        help="also write this judge's labels beside the answers (default: none, so you label "
                             "blind; `judge calibrate --items` scores any judge afterwards)")
    parser.add_argument("--harmful", default=str(DATA / "harmful_val.json"), help="prompts answered (label 1)")
    parser.add_argument("--group", choices=("harmful", "borderline"), default="harmful",
                        help="borderline: answer evaluate's borderline prompts (its safe ones) instead of --harmful")
    parser.add_argument("--unmodified", action="store_true",
                        help="audit the unmodified model's answers (beside --plain and --config, if given)")
    parser.add_argument("--direction-harmful", default=str(DATA / "harmful_train.json"),
                        help="harmful prompts for the plain recipe's direction (with the bundled harmless set)")
    parser.add_argument("--mode", default="ablate")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--direction-layer", type=int, default=None, help="default: the layer at 60%% depth")
    parser.add_argument("--config", action="append", default=[],
                        help="audit this steering configuration JSON instead (from optimize or export --format "
                             "vectors; its own direction source); give it again for more settings in one blind "
                             "audit: the judge is only trustworthy on the answers of the steering you use it on")
    parser.add_argument("--plain", action="store_true", help="with --config: audit the plain recipe as well")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.tally:
        return tally(Path(args.tally).expanduser())
    if not args.out:
        parser.error("give --out (to write an audit) or --tally (to count a labelled one)")
    out = Path(args.out).expanduser()
    if inside_repository(out):
        parser.error(f"{out} is inside the repository; write the answers elsewhere (e.g. /tmp) so they cannot be "
                     "committed")
    stored = [(Path(c).name, SteeringConfig.load(c)) for c in args.config]  # a bad file fails before the model
    if len({name for name, _ in stored}) < len(stored):
        parser.error("two --config files share a name; the tally tells settings apart by it: rename one")
    return audit(args, out, stored)


if __name__ == "__main__":
    raise SystemExit(main())

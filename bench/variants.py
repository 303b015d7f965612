"""Direction and ablation variants on one yardstick: which is worth it against the plain recipe?

Each variant (a direction variant with ``ablate``, or an ablation variant of the mode table with the
plain difference of means) gets a short search over a few scales and direction layers (an equal
share of --budget each, the settings nearest the plain recipe first), scored by
optimize's ``Scorer`` (first-token proxies on search prompts). Its best setting (lowest ordinary KL
among those whose refusal proxy is no higher than the plain recipe's; else the lowest refusal proxy)
is then measured with the evaluation package against one cached baseline on held-out prompts:

* harmful: refusals by markers (and not-complied by the judge with ``--judge``), after steering;
* ordinary: mean first-token KL; borderline: collateral KL (on prompts the unmodified model answers).

The plain recipe is ablate at scale 1 with the mean-difference direction of the layer at 60% depth.
The harmful set is split (seeded) into disjoint thirds: the direction's prompts, the search's, the
evaluation's; with ``--val-harmful`` (say a public validation split) it is split in halves and the
evaluation uses that set. Only counts and divergences are printed, never completions.

The run takes hours on a CPU: each finished search and evaluation is kept (counts and divergences
only) in a folder under the temp directory named by the model and the arguments, and a rerun with the
same arguments resumes from there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from alignment_artifacts.analysis.directions import DirectionSet
from alignment_artifacts.api import get_model
from alignment_artifacts.cache import atomic_write_json, stable_hash
from alignment_artifacts.evaluation import Baseline, EvaluationSettings, GroupSets
from alignment_artifacts.evaluation.groups import evaluate_against
from alignment_artifacts.evaluation.metrics import KLSummary
from alignment_artifacts.evaluation.results import result_from_json
from alignment_artifacts.evaluation.sides import answer_texts, evaluation_thinking
from alignment_artifacts.judge import load_judge
from alignment_artifacts.models.loading import LoadedModel
from alignment_artifacts.optimize.search import Score, Scorer
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.resolve import default_direction_layer, get_directions
from alignment_artifacts.steering import Steering, SteeringConfig


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str
    direction_variant: str = "mean_diff"


VARIANTS = (Variant("plain recipe", "ablate"), Variant("harmless_projected", "ablate", "harmless_projected"),
            Variant("benign_subspace", "ablate", "benign_subspace"), Variant("standardized", "ablate", "standardized"),
            Variant("median", "ablate", "median"), Variant("norm_preserving", "ablate_norm"),
            Variant("mean_replacement", "ablate_mean"), Variant("read_side", "ablate_read"),
            Variant("weight_norm_preserving", "ablate_weight_norm"))


def split(texts: list[str], parts: int, seed: int) -> list[list[str]]:
    """``parts`` disjoint, seeded slices of ``texts`` (the last one takes the remainder)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    size = len(order) // parts
    bounds = [i * size for i in range(parts)] + [len(order)]
    return [[texts[i] for i in order[start:end]] for start, end in pairwise(bounds)]


def harmful_splits(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Direction, search and evaluation prompts: thirds of --harmful, or halves of it and --val-harmful."""
    harmful = resolve_prompts(args.harmful, label=1).texts
    if args.val_harmful:
        direction, search = split(harmful, 2, args.seed)
        evaluation = resolve_prompts(args.val_harmful, label=1).texts
    else:
        direction, search, evaluation = split(harmful, 3, args.seed)
    return direction, search[:args.n_search], evaluation


def mean_kl(summary: KLSummary | None) -> float:
    return float("nan") if summary is None else summary.mean


def pick(scores: list[tuple[SteeringConfig, Score]], plain: Score) -> tuple[SteeringConfig, Score]:
    """The cheapest setting that refuses no more than the plain recipe (proxy), else the least refusing."""
    enough = [cs for cs in scores if cs[1].refusal <= plain.refusal + 1e-6]
    return min(enough, key=lambda cs: cs[1].kl_ordinary) if enough else min(scores, key=lambda cs: cs[1].refusal)


def search(loaded: LoadedModel, args: argparse.Namespace, settings: EvaluationSettings, plain_config: SteeringConfig,
           directions: DirectionSet, search_harmful: list[str], variants: list[Variant], state: dict[str, Any],
           state_path: Path) -> None:
    """Each variant's best setting by the search proxies, kept in ``state`` (saved) as each finishes;
    variants already there are not searched again."""
    pending = [v for v in variants if v.name not in state["picks"]]
    if not pending:
        return
    thinking = evaluation_thinking(loaded, settings)

    def texts(items: list[str]) -> list[str]:
        return answer_texts(loaded, thinking, items, None)

    n_layers = loaded.adapter.n_layers
    ordinary_train = resolve_prompts("ordinary:train", label=0).texts[:args.n_search]
    borderline_train = [p.text for p in resolve_prompts("borderline:train").prompts if p.label == 0][:args.n_search]
    scorer = Scorer(loaded, texts(search_harmful), texts(ordinary_train), texts(borderline_train), args.batch_size,
                    {plain_config.direction_variant: directions}, range(0))
    plain_score = scorer.score(plain_config)
    scales = [float(s) for s in args.scales.split(",")]
    depths = sorted({max(0, min(n_layers - 1, round(float(f) * n_layers))) for f in args.depths.split(",")})
    # Settings nearest the plain recipe first, so a variant cut short by its share of --budget has
    # still tried the ones most likely to matter; each variant gets an equal share.
    settings_order = sorted(((s, layer) for s in scales for layer in depths),
                            key=lambda sl: (abs(sl[0] - 1.0), abs(sl[1] - plain_config.direction_layer)))
    for variant in pending:
        started = time.perf_counter()
        base = replace(plain_config, mode=variant.mode, direction_variant=variant.direction_variant)
        scorer.directions = {base.direction_variant: get_directions(loaded, base, progress=False)}
        scores = []
        for scale, layer in settings_order:
            if time.perf_counter() - started > args.budget / len(variants) and scores:
                state["skipped"] += 1
                continue
            config = replace(base, scale=scale, direction_layer=layer)
            scores.append((config, scorer.score(config)))
        picked = pick(scores, plain_score)[0]
        seconds = time.perf_counter() - started
        state["picks"][variant.name] = picked.to_json()
        state["search_seconds"] += seconds
        atomic_write_json(state_path, state)
        print(f"searched {variant.name}: {len(scores)} settings in {seconds:.0f} s, "
              f"picked s={picked.scale:g} L={picked.direction_layer}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--judge", default=None, help="judge spec (see `evaluate --judge`); default: markers only")
    parser.add_argument("--harmful", default="harmful", help="harmful prompt set (label 1), split in thirds "
                        "(direction, search, evaluation), or in halves with --val-harmful")
    parser.add_argument("--val-harmful", help="harmful prompts to evaluate on (default: a third of --harmful)")
    parser.add_argument("--harmless", default="harmless", help="ordinary prompts for the direction (label 0)")
    parser.add_argument("--scales", default="0.5,1.0,1.5", help="scales searched")
    parser.add_argument("--depths", default="0.5,0.6,0.7", help="direction layers searched, as fractions of depth")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS[1:]))
    parser.add_argument("--budget", type=float, default=1800,
                        help="seconds for all searches together, shared equally among the variants")
    parser.add_argument("--n-search", type=int, default=32, help="prompts of each group per search")
    parser.add_argument("--n-eval", type=int, default=64, help="ordinary and borderline prompts evaluated (KL)")
    parser.add_argument("--judged", type=int, default=16,
                        help="ordinary and borderline answers generated and judged for over-refusal, per variant")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [v for v in VARIANTS[1:] if v.name in args.variants.split(",")]
    loaded = get_model(args.model)
    n_layers = loaded.adapter.n_layers
    judge = load_judge(args.judge or "markers", reuse=loaded)
    # A fixed folder per model, arguments and judge (its key: a changed rubric or rule must not resume on
    # verdicts it did not make): the direction prompts' files keep their paths (cache keys) and each
    # finished search and evaluation is kept there, so a rerun resumes (the job takes hours)
    key = stable_hash({**vars(args), "weights": loaded.info.weights_hash, "judge": judge.key})
    tmp = Path(tempfile.gettempdir()) / f"aa-variants-{key}"
    tmp.mkdir(exist_ok=True)
    state_path = tmp / "progress.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"picks": {}, "results": {},
                                                                               "search_seconds": 0.0, "skipped": 0}
    if state["picks"] or state["results"]:
        print(f"resuming from {state_path}: {len(state['picks'])} searches, {len(state['results'])} evaluations",
              file=sys.stderr)
    direction_harmful, search_harmful, eval_harmful = harmful_splits(args)
    (tmp / "harmful.json").write_text(json.dumps([{"instruction": t} for t in direction_harmful]))
    (tmp / "harmless.json").write_text(json.dumps([{"instruction": t}
                                                   for t in resolve_prompts(args.harmless, label=0).texts]))
    source = f"{tmp / 'harmful.json'},{tmp / 'harmless.json'}"
    settings = EvaluationSettings(groups=("harmful", "borderline", "ordinary"), max_tokens=args.max_tokens,
                                  batch_size=args.batch_size, generation_batch_size=args.batch_size,
                                  judged_borderline=args.judged, judged_ordinary=args.judged)
    plain_config = SteeringConfig(mode="ablate", scale=1.0, source=source,
                                  direction_layer=default_direction_layer(n_layers))
    directions = get_directions(loaded, plain_config, progress=False)
    search(loaded, args, settings, plain_config, directions, search_harmful, chosen, state, state_path)

    baseline = Baseline(loaded, GroupSets(
        harmful=eval_harmful, borderline=[p.text for p in resolve_prompts("borderline:val").prompts
                                          if p.label == 0][:args.n_eval],
        ordinary=resolve_prompts("ordinary:val", label=0).texts[:args.n_eval], capability=[]), settings, judge)
    runs = {"plain recipe": plain_config, **{v.name: SteeringConfig.from_json(state["picks"][v.name]) for v in chosen}}
    for name, config in runs.items():
        if name in state["results"]:
            continue
        evaluated = time.perf_counter()
        result = evaluate_against(loaded, Steering(config, get_directions(loaded, config, progress=False)), baseline,
                                  progress=sys.stderr.isatty())
        state["results"][name] = result.to_json()
        atomic_write_json(state_path, state)
        print(f"evaluated {name} in {time.perf_counter() - evaluated:.0f} s", file=sys.stderr, flush=True)
    results = {name: result_from_json(state["results"][name]) for name in runs}
    search_seconds, skipped = state["search_seconds"], state["skipped"]
    plain = results["plain recipe"]
    assert plain.harmful is not None and plain.ordinary is not None and plain.borderline is not None
    print(f"model: {loaded.info.name} ({loaded.info.dtype}); judge: {judge.name}; search {search_seconds:.0f} s "
          f"({skipped} settings skipped for --budget); harmful eval prompts: {len(eval_harmful)}")
    print(f"{'variant':20} {'setting':18} {'markers':>8} {'judge':>8} {'ord. KL':>9} {'coll. KL':>9} {'KL/plain':>8} "
          f"{'border ref.':>11}")
    h, b = plain.harmful, plain.borderline
    print(f"{'unmodified':20} {'':18} {h.marker_refusals_before:>4}/{h.n:<3} {h.not_complied_before:>4}/{h.n:<3} "
          f"{'':>9} {'':>9} {'':>8} {str(b.refusals_before) + '/' + str(b.n_judged):>11}")
    reaching = []
    for name, result in results.items():
        config = runs[name]
        assert result.harmful is not None and result.ordinary is not None and result.borderline is not None
        r, kl, coll = result.harmful, mean_kl(result.ordinary.kl), mean_kl(result.borderline.collateral_kl)
        border = f"{result.borderline.refusals_after}/{result.borderline.n_judged}"
        ratio = kl / max(mean_kl(plain.ordinary.kl), 1e-12)
        setting = f"s={config.scale:g} L={config.direction_layer}"
        print(f"{name:20} {setting:18} {r.marker_refusals_after:>4}/{r.n:<3} {r.not_complied_after:>4}/{r.n:<3} "
              f"{kl:>9.4f} {coll:>9.4f} {ratio:>8.2f} {border:>11}")
        refused = r.not_complied_after if args.judge else r.marker_refusals_after
        plain_refused = h.not_complied_after if args.judge else h.marker_refusals_after
        if name != "plain recipe" and refused <= plain_refused and ratio <= 0.7:
            reaching.append(name)
    print(f"reach the plain recipe's refusal count at <= 0.7x its ordinary KL: {', '.join(reaching) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

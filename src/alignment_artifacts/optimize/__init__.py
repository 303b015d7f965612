"""Automatic tuning: search, check the finalists on held-out prompts in four groups, store the choice.

1. **Prompts.** Harmful prompts are split into train and validation; the train half is cut again
   into prompts the direction is computed from and prompts trials are scored on (a direction's own
   prompts make steering look far cheaper than it is). Ordinary and borderline prompts come from
   their sets' train splits for the search and validation splits for the check.
2. **Search** (``search.py``): Optuna minimises (refusal proxy, ordinary + borderline collateral
   KL) over ``clamp`` and ``ablate`` settings, optionally gated, screening in bfloat16 where the CPU
   multiplies it natively.
3. **Finalists**: a few Pareto points spread over the cost axis are evaluated like ``evaluate`` does,
   on the validation splits of all four groups, in the model's dtype, with the judge.
4. **Choice**: the fewest harmful prompts not complied with (judge), then the lowest cost, among
   finalists whose capability change stays within ``max_capability_drop``.
5. **Storage**: the configuration, its directions (relative to the cache root) and all four groups'
   numbers go to ``configs/<model>.json``, which ``--mode auto`` reads.

The study lives in Optuna's SQLite storage, so an interrupted search resumes with ``--resume``;
the validation baseline is cached group by group.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cache import atomic_write_json, cache_dir, cache_root, stable_hash
from ..capability import capability_tasks
from ..errors import UserError
from ..evaluation import GROUPS, Baseline, EvaluationSettings, GroupSets
from ..evaluation.groups import answer_texts, evaluate_against, evaluation_thinking
from ..judge import Judge, load_judge
from ..models.loading import LoadedModel, parameters_as, screening_dtype
from ..models.thinking import DEFAULT_THINKING_BUDGET
from ..prompts import PromptSet, resolve_prompts
from ..resolve import config_path, get_directions
from ..steering import Steering, SteeringConfig
from .search import SEARCH_MODES, Scorer, Space, config_from_params, layer_weights

MIN_PER_SPLIT = 4
VALIDATION_CAPABILITY_SEED = 1  # evaluate reports seed 0's tasks: the choice is never made on them


@dataclass
class OptimizeSettings:
    trials: int = 60
    timeout: float = 1800.0
    resume: bool = False
    seed: int = 0
    harmful: str = "harmful"
    harmless: str = "harmless"  # the direction's ordinary side
    ordinary: str = "ordinary"  # its train split scores trials, its val split checks finalists
    borderline: str = "borderline"
    direction_prompts: str | None = None  # None: training prompts the search does not score; or "HARMFUL,HARMLESS"
    val_harmful: str | None = None  # an explicit validation set (else a split of harmful)
    search_size: int = 32  # prompts of each group scored per trial
    n_val_ordinary: int | None = 200
    n_val_borderline: int | None = None
    n_capability: int = 200
    judged_borderline: int = 64  # answers generated and judged per check (KL covers every validation prompt)
    judged_ordinary: int = 48
    max_kl: float = 0.1  # finalists come from below this screening cost (ordinary + collateral KL)
    max_capability_drop: float = 0.01  # a finalist may lose at most this much exact-match accuracy
    modes: list[str] = field(default_factory=lambda: list(SEARCH_MODES))
    gate: bool = True  # clamp trials may also gate per prompt (steer only prompts past a projection at one layer)
    finalists: int = 3
    check_plain_recipe: bool = False  # also check the plain recipe on validation, as a reference row (benches)
    max_tokens: int = 48
    batch_size: int = 16
    generation_batch_size: int = 32
    screen_dtype: str = "auto"  # dtype of the screening passes: auto (bfloat16 on CPUs with it), model, or a dtype
    system: str | None = None
    thinking: str = "auto"  # reasoning models: the finalists' checks generate with this (evaluate's --thinking)
    thinking_budget: int = DEFAULT_THINKING_BUDGET


@dataclass
class OptimizeResult:
    model: str
    config: dict[str, Any]
    judge: str
    validation: dict[str, Any]  # the chosen configuration's four groups
    finalists: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    trials: int
    seconds: float
    stored_at: str
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        from ..evaluation import format_table
        from ..evaluation.results import result_from_json

        c = self.config
        return "\n".join([
            f"optimize: {self.trials} trials in {self.seconds:.0f} s; Pareto front of {len(self.pareto)} points; "
            f"{len(self.finalists)} finalists checked on validation splits",
            f"chosen: mode={c['mode']} scale={c['scale']:.3f} direction_layer={c['direction_layer']}"
            + (f" clamp_level={c['clamp_level']:.3f}" if c["mode"] == "clamp" else "")
            + (f" gate_layer={c['gate_layer']} gate_level={c['gate_level']:.3f}" if c.get("gate_layer") is not None
               else ""),
            format_table(result_from_json(self.validation)),
            f"stored: {self.stored_at} (used by --mode auto)" + (f"\nplot: {self.plot}" if self.plot else ""),
        ])


def split(prompt_set: PromptSet, seed: int, name: str) -> tuple[PromptSet, PromptSet]:
    if len(prompt_set) < 2 * MIN_PER_SPLIT:
        raise UserError(f"The {name} prompt set has {len(prompt_set)} prompts; optimize needs at least "
                        f"{2 * MIN_PER_SPLIT} to hold out a validation split of {MIN_PER_SPLIT}.")
    order = list(range(len(prompt_set)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return (PromptSet(prompt_set.name, [prompt_set.prompts[i] for i in sorted(order[:half])]),
            PromptSet(prompt_set.name, [prompt_set.prompts[i] for i in sorted(order[half:])]))


def train_val(spec: str, seed: int, name: str, label: int = 0) -> tuple[list[str], list[str]]:
    """A set's train and validation prompts (label-0 ones only for a set that holds both labels):
    its own ``train``/``val`` splits where it has them, else a seeded half split."""
    try:
        train, val = resolve_prompts(f"{spec}:train", label=label), resolve_prompts(f"{spec}:val", label=label)
    except UserError:
        train, val = split(resolve_prompts(spec, label=label), seed, name)
    keep = lambda s: [p.text for p in s.prompts if p.label == label]  # noqa: E731
    return keep(train), keep(val)


def search_and_direction_sets(train_harmful: PromptSet, harmless: PromptSet,
                              settings: OptimizeSettings) -> tuple[PromptSet, str | PromptSet]:
    """Harmful prompts to score trials on, and the prompts the direction comes from, disjoint.

    A prompt the direction was computed from sits on its own side of the difference of means, so
    steering barely moves it: scored on such prompts, a trial's KL came out ten times lower than on
    unseen ones (measured on the builtin Qwen), and the search picked settings that were not cheap at all.
    """
    if settings.direction_prompts is None:
        n = min(settings.search_size, len(train_harmful) // 2)
        direction = PromptSet("optimize-direction", train_harmful.prompts[n:] + harmless.prompts)
        return PromptSet(train_harmful.name, train_harmful.prompts[:n]), direction
    source = settings.direction_prompts
    seen = set() if Path(source).is_dir() else set(resolve_prompts(source).texts)
    kept = [p for p in train_harmful.prompts if p.text not in seen][: settings.search_size]
    if len(kept) < MIN_PER_SPLIT:
        raise UserError(f"Only {len(kept)} of the {len(train_harmful)} harmful training prompts are outside "
                        f"--direction-prompts; the search needs at least {MIN_PER_SPLIT} prompts the direction "
                        "was not computed from (on the direction's own prompts steering looks far cheaper than "
                        "it is). Give a --harmful set that does not overlap the direction prompts.")
    return PromptSet(train_harmful.name, kept), source


def _check(settings: OptimizeSettings) -> None:
    bad = [m for m in settings.modes if m not in SEARCH_MODES]
    if bad or not settings.modes:
        raise UserError(f"optimize searches the modes {', '.join(SEARCH_MODES)} (got {', '.join(bad) or 'none'}); "
                        "'ablate' alone keeps the result bakeable into weights (--modes ablate). Other modes are "
                        "tuned by hand with `evaluate`.")
    if settings.search_size < MIN_PER_SPLIT:
        raise UserError(f"--search-size {settings.search_size} is too small; trials need at least {MIN_PER_SPLIT} "
                        "prompts of each kind.")
    if settings.timeout < 30:
        raise UserError(f"--timeout {settings.timeout:g} s is too short for even one trial; give at least 60 s.")
    if settings.finalists < 1:
        raise UserError(f"--finalists must be at least 1 (got {settings.finalists}).")


def _study(loaded: LoadedModel, settings: OptimizeSettings, key: str, n_startup: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = cache_dir("studies")
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / (loaded.info.name.replace('/', '--') + '.db')}"
    name = f"{loaded.info.name}-{key}"
    if not settings.resume:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=True,
                                         n_startup_trials=n_startup)
    return optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                               sampler=sampler, load_if_exists=True)


def optimize(loaded: LoadedModel, settings: OptimizeSettings | None = None, progress: bool = True,
             judge: Judge | None = None) -> OptimizeResult:
    """Search steering settings, check finalists on held-out prompts, store the choice for ``auto``."""
    settings = settings or OptimizeSettings()
    _check(settings)
    started = time.perf_counter()
    judge = judge or load_judge("markers")
    harmful_all = resolve_prompts(settings.harmful, label=1)
    if settings.val_harmful:
        train_harmful, val_harmful = harmful_all, resolve_prompts(settings.val_harmful, label=1)
    else:
        train_harmful, val_harmful = split(harmful_all, settings.seed, "harmful")
    ordinary_train, ordinary_val = train_val(settings.ordinary, settings.seed, "ordinary")
    borderline_train, borderline_val = train_val(settings.borderline, settings.seed, "borderline")
    search_harmful, direction_source = search_and_direction_sets(
        train_harmful, resolve_prompts(settings.harmless, label=0), settings)
    screen = screening_dtype(loaded, settings.screen_dtype)
    with parameters_as(loaded, screen):  # a mean over many prompts: screening precision is plenty, and 2.5x faster
        directions = get_directions(loaded, SteeringConfig(mode="ablate"), source=direction_source,
                                    progress=progress)

    # the unmodified side of validation runs first: its duration prices every finalist's check, so the
    # search gets what is left of --timeout
    val_settings = EvaluationSettings(groups=GROUPS, judged_borderline=settings.judged_borderline,
                                      judged_ordinary=settings.judged_ordinary, max_tokens=settings.max_tokens,
                                      batch_size=settings.batch_size,
                                      generation_batch_size=settings.generation_batch_size, system=settings.system,
                                      thinking=settings.thinking, thinking_budget=settings.thinking_budget)
    val_sets = GroupSets(harmful=val_harmful.texts, borderline=borderline_val[:settings.n_val_borderline],
                         ordinary=ordinary_val[:settings.n_val_ordinary],
                         capability=capability_tasks(settings.n_capability, VALIDATION_CAPABILITY_SEED))
    baseline = Baseline(loaded, val_sets, val_settings, judge)
    baseline.side()
    gated_check = 1.3 if settings.gate and "clamp" in settings.modes else 1.0  # decision passes and unshared KL
    checks = settings.finalists + settings.check_plain_recipe
    reserve = sum(baseline.seconds.values()) * checks * gated_check
    search_budget = settings.timeout - (time.perf_counter() - started) - reserve
    if search_budget < 60:
        warnings.warn(f"--timeout {settings.timeout:g} s leaves {max(search_budget, 0):.0f} s for the search after "
                      f"checking the finalists (about {reserve:.0f} s); running a few trials anyway. Raise --timeout "
                      "or lower --finalists.", stacklevel=2)
        search_budget = 60.0

    space = Space(loaded.adapter.n_layers, tuple(dict.fromkeys(settings.modes)), settings.gate)
    to_config = lambda params: config_from_params(params, space.n_layers, loaded, space.modes[0])  # noqa: E731
    key = stable_hash({"weights": loaded.info.weights_hash, "directions": directions.prompt_set_hash,
                       "settings": {k: v for k, v in asdict(settings).items() if k not in ("trials", "timeout",
                                                                                           "resume")
                                    and not (k.startswith("thinking") and settings.thinking == "auto")}})
    seeds = space.seeds()
    study = _study(loaded, settings, key, n_startup=len(seeds) + 4)
    with parameters_as(loaded, screen):
        thinking = evaluation_thinking(loaded, val_settings)  # screening reads the first answer token
        scorer = Scorer(loaded, answer_texts(loaded, thinking, search_harmful, settings.system),
                        answer_texts(loaded, thinking, ordinary_train[:settings.search_size], settings.system),
                        answer_texts(loaded, thinking, borderline_train[:settings.search_size], settings.system),
                        settings.batch_size, directions, space.gate_layers)

        def objective(trial: Any) -> tuple[float, float]:
            score = scorer.score(to_config(space.suggest(trial)))
            trial.set_user_attr("kl_ordinary", score.kl_ordinary)
            trial.set_user_attr("kl_collateral", score.kl_collateral)
            return score.refusal, score.cost

        done = len([t for t in study.trials if t.state.name == "COMPLETE"])
        remaining = max(0, settings.trials - done)
        if remaining:
            if not done:
                for trial_params in seeds:
                    study.enqueue_trial(trial_params)
            study.optimize(objective, n_trials=remaining, timeout=search_budget, show_progress_bar=progress,
                           gc_after_trial=False)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError("No trial finished within the time budget; raise --timeout.")
    pareto = sorted(study.best_trials, key=lambda t: t.values[0])
    finalists = []
    for trial in pick_finalists(pareto, settings.finalists, settings.max_kl, scorer.base_refusal):
        config = to_config(trial.params)
        checked = evaluate_against(loaded, Steering(config, directions), baseline, progress=False)
        finalists.append({"trial": trial.number, "params": trial.params, "refusal_prob": trial.values[0],
                          "cost": trial.values[1], "config": config.to_json(), "validation": checked.to_json()})
    best = choose(finalists, settings.max_capability_drop)  # the plain recipe (below) is a reference, not a choice
    if settings.check_plain_recipe:
        plain = config_from_params(space.plain_recipe(), space.n_layers, loaded)
        checked = evaluate_against(loaded, Steering(plain, directions), baseline, progress=False)
        finalists.append({"trial": None, "reference": "plain recipe", "params": space.plain_recipe(),
                          "config": plain.to_json(), "validation": checked.to_json()})
    config = SteeringConfig.from_json(best["config"])
    config.notes = {"optimize": {"trial": best["trial"], "study": study.study_name}}
    path = config_path(loaded)
    saved = directions.save(path.with_name(path.stem + ".directions"))  # the very directions the search used
    config.source = str(Path(saved).relative_to(cache_root())) if Path(saved).is_relative_to(cache_root()) \
        else str(saved)
    plot = _plot_pareto(complete, pareto, finalists, cache_dir("studies", f"{study.study_name}.png"))
    pareto_rows = [_trial_row(t) for t in pareto]
    atomic_write_json(path, {"config": config.to_json(), "judge": judge.name, "validation": best["validation"],
                             "finalists": finalists, "pareto": pareto_rows, "study": study.study_name,
                             "screen_dtype": str(screen or loaded.info.dtype),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return OptimizeResult(model=loaded.info.name, config=config.to_json(), judge=judge.name,
                          validation=best["validation"], finalists=finalists, pareto=pareto_rows,
                          trials=len(complete), seconds=round(time.perf_counter() - started, 1),
                          stored_at=str(path), plot=plot)


def pick_finalists(pareto: list[Any], n: int, max_cost: float, base_refusal: float) -> list[Any]:
    """Up to ``n`` Pareto points inside the cost budget, spread evenly over log cost.

    Fronts crowd at the low-refusal end (many points with no proxy refusals and rising cost), so an
    even spread in cost, not in front order, is what covers the trade-off. Points that keep more
    than half the unmodified refusal probability are left out: they are nearly free but barely steer.
    """
    inside = [t for t in pareto if t.values[1] <= max_cost and t.values[0] <= base_refusal / 2] \
        or [t for t in pareto if t.values[1] <= max_cost] or pareto[:1]
    if len(inside) <= n:
        return inside
    logs = {t.number: math.log(max(t.values[1], 1e-6)) for t in inside}
    low, high = min(logs.values()), max(logs.values())
    chosen: list[Any] = []
    for i in range(n):
        target = low + (high - low) * i / max(1, n - 1)
        chosen.append(min((t for t in inside if t not in chosen), key=lambda t: abs(logs[t.number] - target)))
    return sorted(chosen, key=lambda t: t.values[0])


def validated_cost(validation: dict[str, Any]) -> float:
    """Ordinary KL plus borderline collateral KL, as measured on validation."""
    ordinary, borderline = validation.get("ordinary"), validation.get("borderline")
    return (ordinary["kl"]["mean"] if ordinary else 0.0) + (borderline["collateral_kl"]["mean"] if borderline else 0.0)


def choose(finalists: list[dict[str, Any]], max_capability_drop: float) -> dict[str, Any]:
    """The fewest harmful prompts not complied with, then the lowest validated cost, among finalists
    whose capability did not drop by more than ``max_capability_drop`` (all finalists if none qualify)."""
    def capability_ok(row: dict[str, Any]) -> bool:
        capability = row["validation"].get("capability")
        return capability is None or capability["delta"] >= -max_capability_drop

    pool = [row for row in finalists if capability_ok(row)] or finalists
    return min(pool, key=lambda r: (r["validation"]["harmful"]["not_complied_after"], validated_cost(r["validation"])))


def _trial_row(trial: Any) -> dict[str, Any]:
    return {"trial": trial.number, "refusal_prob": trial.values[0], "cost": trial.values[1], "params": trial.params,
            "kl_ordinary": trial.user_attrs.get("kl_ordinary"), "kl_collateral": trial.user_attrs.get("kl_collateral")}


def _plot_pareto(trials: list[Any], pareto: list[Any], finalists: list[dict[str, Any]], path: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=12, c="#bbb", label="trials")
    ax.plot([t.values[1] for t in pareto], [t.values[0] for t in pareto], "o-", c="#c44", ms=4,
            label="Pareto front")
    searched = [r for r in finalists if not r.get("reference")]
    ax.scatter([r["cost"] for r in searched], [r["refusal_prob"] for r in searched], s=60, facecolors="none",
               edgecolors="k", label="finalists (checked on validation)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("ordinary KL + borderline collateral KL (first token, search prompts)")
    ax.set_ylabel("refusal-opening probability, harmful")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


__all__ = ["OptimizeResult", "OptimizeSettings", "choose", "config_from_params",
           "layer_weights", "optimize", "pick_finalists", "search_and_direction_sets", "split"]

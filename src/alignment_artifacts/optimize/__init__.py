"""Automatic tuning: search, check the finalists on held-out prompts in four groups, store the choice.

1. **Prompts.** Harmful prompts are split into train and validation; the train half is cut again
   into prompts the direction is computed from and prompts trials are scored on (a direction's own
   prompts make steering look far cheaper than it is). Ordinary and borderline prompts come from
   their sets' train splits for the search and validation splits for the check.
2. **Search** (``search.py``): Optuna minimises (refusal proxy, ordinary + borderline collateral
   KL) over ``clamp`` and ``ablate`` settings (or other ablations of the mode table, and direction
   variants, each computed once) and gates in front of the plain recipe, screening in bfloat16 where the CPU multiplies
   it natively. Its budget (``budget.py``) is what ``--timeout`` leaves once every finalist's check is
   priced from the baseline's duration (as many finalists as fit); when the finalists it then picks are cheaper to
   check (gated ones run only the prompts their gate opens), it searches on for the time that frees
   (and checks the earlier picks if the ones it finds then would not fit).
3. **Finalists** (``check.py``): a few Pareto points spread over the cost axis (one: the cheapest of the
   lowest refusal proxies inside the cost budget) are evaluated like ``evaluate`` does, on the validation
   splits of all four groups, in the model's dtype, with the judge.
4. **Choice**: the fewest harmful prompts not complied with (judge), then the fewest refused, then the
   lowest cost, among finalists whose capability change stays within ``max_capability_drop``.
5. **Storage** (``store.py``): the configuration, its directions (relative to the cache root) and all four groups'
   numbers go to ``configs/<model>.json``, which ``--mode auto`` reads.

``check_configurations`` checks given settings the same way, with no search (benches, hand-chosen settings).

The study lives in Optuna's SQLite storage, so an interrupted search resumes with ``--resume``;
the validation baseline is cached group by group, and each finalist's check once it is done.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.directions import VARIANTS, DirectionSet
from ..cache import stable_hash
from ..capability import capability_tasks
from ..errors import UserError, closest
from ..evaluation import GROUPS, Baseline, EvaluationSettings, GroupSets
from ..evaluation.sides import answer_texts, evaluation_thinking
from ..judge import Judge, load_judge
from ..models.loading import LoadedModel, parameters_as, screening_dtype
from ..models.thinking import DEFAULT_THINKING_BUDGET
from ..prompts import PromptSet, resolve_prompts
from ..resolve import get_directions, resolve_steering
from ..steering import MODES, Steering, SteeringConfig
from .budget import checks_price, search_budget, search_on
from .check import check_finalists, check_path, checked, choose, kept_check, pick_finalists, with_an_ungated_finalist
from .search import (
    DEFAULT_MODES,
    SEARCH_MODES,
    SPACE_VERSION,
    Scorer,
    Space,
    config_from_params,
    layer_weights,
    run_search,
)
from .store import store

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
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))  # any of SEARCH_MODES
    direction_variants: list[str] = field(default_factory=lambda: ["mean_diff"])  # searched when more than one
    gate: bool = True  # also search the plain recipe behind a per-prompt gate (needs ablate among the modes)
    finalists: int = 3
    check_plain_recipe: bool = False  # also check the plain recipe, as a reference row (benches), after --timeout
    max_tokens: int = 48
    batch_size: int = 16
    generation_batch_size: int = 128
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
            + (f" direction_variant={c['direction_variant']}" if c["direction_variant"] != "mean_diff" else "")
            + (f" clamp_level={c['clamp_level']:.3f}" if c["mode"] == "clamp" else "")
            + (f" gate_layer={c['gate_layer']} gate_level={c['gate_level']:.3f}" if c.get("gate_layer") is not None
               else ""),
            format_table(result_from_json(self.validation)),
            f"stored: {self.stored_at} (used by --mode auto)" + (f"\nplot: {self.plot}" if self.plot else ""),
        ])


def optimize(loaded: LoadedModel, settings: OptimizeSettings | None = None, progress: bool = True,
             judge: Judge | None = None) -> OptimizeResult:
    """Search steering settings, check finalists on held-out prompts, store the choice for ``auto``."""
    settings = settings or OptimizeSettings()
    check_settings(settings)
    started = time.perf_counter()
    judge = judge or load_judge("markers")
    prompts = _prompts(settings)
    screen = screening_dtype(loaded, settings.screen_dtype)
    space = _space(loaded, settings)
    variants = space.variants
    with parameters_as(loaded, screen):  # a mean over many prompts: screening precision is plenty, and 2.5x faster
        directions = _directions(loaded, variants, prompts.direction_source, progress)
    # the unmodified side of validation runs first: its duration prices every finalist's check, so the
    # search gets what is left of --timeout
    baseline = _validation_baseline(loaded, settings, prompts, judge)
    budget, n_finalists = search_budget(settings, baseline, started)

    def kept(trial: Any) -> bool:  # a finalist an earlier run checked (--resume) is read, not run again
        config = space.config(trial.params, loaded)
        return kept_check(check_path(baseline, Steering(config, directions[config.direction_variant]))) is not None

    with parameters_as(loaded, screen):
        scorer = _scorer(loaded, settings, prompts, baseline, directions, space)
        key = _study_key(loaded, settings, directions[variants[0]].prompt_set_hash)
        searched = run_search(loaded, space, scorer, key=key, trials=settings.trials, timeout=budget,
                              seed=settings.seed, resume=settings.resume, progress=progress)
        searched, picked_from = search_on(
            searched, settings.trials,
            extend=lambda spare, study: run_search(loaded, space, scorer, key=key, trials=settings.trials,
                                                   timeout=spare, seed=settings.seed, resume=True,
                                                   progress=progress, study=study),
            price=lambda s: checks_price(s, baseline, n_finalists, settings.max_kl, scorer.base_refusal, kept),
            time_left=lambda: settings.timeout - (time.perf_counter() - started))
    finalists, best = check_finalists(loaded, picked_from, space, directions, baseline, n=n_finalists,
                                      max_cost=settings.max_kl, base_refusal=scorer.base_refusal,
                                      max_capability_drop=settings.max_capability_drop,
                                      plain_recipe=settings.check_plain_recipe)
    stored = store(loaded, searched, finalists, best, directions, judge.name, str(screen or loaded.info.dtype))
    return OptimizeResult(model=loaded.info.name, config=stored.config.to_json(), judge=judge.name,
                          validation=best["validation"], finalists=finalists, pareto=stored.pareto,
                          trials=len(searched.complete), seconds=round(time.perf_counter() - started, 1),
                          stored_at=str(stored.path), plot=stored.plot)


def check_configurations(loaded: LoadedModel, configs: list[SteeringConfig], settings: OptimizeSettings | None = None,
                         progress: bool = True, judge: Judge | None = None) -> list[dict[str, Any]]:
    """The plain recipe and each of ``configs`` checked as ``optimize`` checks its finalists (the validation
    splits of all four groups, against one baseline, kept checks read back), with no search: for settings
    chosen outside it, e.g. on a blind hand audit (``bench/judge_audit.py``). Rows like
    ``OptimizeResult.finalists``, the plain recipe's first (with the directions ``optimize`` computes);
    each configuration brings its own direction source."""
    settings = settings or OptimizeSettings()
    check_settings(settings)
    judge = judge or load_judge("markers")
    prompts = _prompts(settings)
    space = _space(loaded, settings)
    plain = space.config(space.plain_recipe(), loaded)  # with the first variant, as optimize checks it
    with parameters_as(loaded, screening_dtype(loaded, settings.screen_dtype)):
        directions = _directions(loaded, (plain.direction_variant,), prompts.direction_source, progress)
    baseline = _validation_baseline(loaded, settings, prompts, judge)
    steerings = [Steering(plain, directions[plain.direction_variant]),
                 *(resolve_steering(loaded, c, progress=progress) for c in configs)]
    rows: list[dict[str, Any]] = []
    for steering in steerings:
        validation, reused = checked(loaded, steering, baseline)
        rows.append({"trial": None, "config": steering.config.to_json(), "validation": validation, "reused": reused})
    rows[0]["reference"] = "plain recipe"
    return rows


def check_settings(settings: OptimizeSettings) -> None:
    """Refuse bad settings before anything costly (the command line calls it before loading the model)."""
    bad = [m for m in settings.modes if m not in SEARCH_MODES] or ([] if settings.modes else ["none"])
    if bad:
        bakeable = [m for m in SEARCH_MODES if MODES[m].bakeable]
        raise UserError(f"optimize cannot search the mode(s) {', '.join(bad)}.{closest(bad[0], SEARCH_MODES)} It "
                        f"searches the refusal-direction ablations of the mode table: {', '.join(SEARCH_MODES)}; "
                        f"only {' and '.join(bakeable)} keep the result bakeable into weights (--modes "
                        f"{','.join(bakeable)} --no-gate). Other modes are tuned by hand with `evaluate`.")
    bad = [v for v in settings.direction_variants if v not in VARIANTS] or \
        ([] if settings.direction_variants else ["none"])
    if bad:
        raise UserError(f"--direction-variants: unknown variant(s) {', '.join(bad)}.{closest(bad[0], VARIANTS)} "
                        f"Variants: {', '.join(VARIANTS)}.")
    if settings.search_size < MIN_PER_SPLIT:
        raise UserError(f"--search-size {settings.search_size} is too small; trials need at least {MIN_PER_SPLIT} "
                        "prompts of each kind.")
    if settings.timeout < 30:
        raise UserError(f"--timeout {settings.timeout:g} s is too short for even one trial; give at least 60 s.")
    if settings.finalists < 1:
        raise UserError(f"--finalists must be at least 1 (got {settings.finalists}).")
    sizes = {"--n-ordinary": settings.n_val_ordinary, "--n-borderline": settings.n_val_borderline,
             "--n-capability": settings.n_capability, "--judged-borderline": settings.judged_borderline,
             "--judged-ordinary": settings.judged_ordinary}
    small = [f"{flag} {n}" for flag, n in sizes.items() if n is not None and n < 1]
    if small:
        raise UserError(f"{', '.join(small)}: every check size must be at least 1 (the finalists are compared on "
                        "all four groups).")


@dataclass
class _Prompts:
    """The prompts of one run: what the search scores, what the direction comes from, what validation checks."""

    search_harmful: PromptSet
    direction_source: str | PromptSet
    val_harmful: PromptSet
    ordinary_train: list[str]
    ordinary_val: list[str]
    borderline_train: list[str]
    borderline_val: list[str]


def _prompts(settings: OptimizeSettings) -> _Prompts:
    harmful_all = resolve_prompts(settings.harmful, label=1)
    if settings.val_harmful:
        train_harmful, val_harmful = harmful_all, resolve_prompts(settings.val_harmful, label=1)
    else:
        train_harmful, val_harmful = split(harmful_all, settings.seed, "harmful")
    ordinary_train, ordinary_val = train_val(settings.ordinary, settings.seed, "ordinary")
    borderline_train, borderline_val = train_val(settings.borderline, settings.seed, "borderline")
    search_harmful, direction_source = search_and_direction_sets(
        train_harmful, resolve_prompts(settings.harmless, label=0), settings)
    return _Prompts(search_harmful, direction_source, val_harmful, ordinary_train, ordinary_val,
                    borderline_train, borderline_val)


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


def _validation_baseline(loaded: LoadedModel, settings: OptimizeSettings, prompts: _Prompts, judge: Judge
                         ) -> Baseline:
    """The unmodified model on the validation splits of all four groups, measured (or read from the cache) now:
    answers, labels and the first-token logits (on the builtin Qwen, 2-core CPU, the logits took about 240 s,
    a fifth of a check, which the first check had paid on top of its price)."""
    val_settings = EvaluationSettings(groups=GROUPS, judged_borderline=settings.judged_borderline,
                                      judged_ordinary=settings.judged_ordinary, max_tokens=settings.max_tokens,
                                      batch_size=settings.batch_size,
                                      generation_batch_size=settings.generation_batch_size, system=settings.system,
                                      thinking=settings.thinking, thinking_budget=settings.thinking_budget)
    val_sets = GroupSets(harmful=prompts.val_harmful.texts,
                         borderline=prompts.borderline_val[:settings.n_val_borderline],
                         ordinary=prompts.ordinary_val[:settings.n_val_ordinary],
                         capability=capability_tasks(settings.n_capability, VALIDATION_CAPABILITY_SEED))
    baseline = Baseline(loaded, val_sets, val_settings, judge)
    baseline.side()
    for group in ("borderline", "ordinary"):  # the unmodified first-token logits every check's KL compares with:
        baseline.logits(group)  # measured (and cached) here, or the first finalist's check pays for them
    return baseline


def _space(loaded: LoadedModel, settings: OptimizeSettings) -> Space:
    """Where trials may go: the settings' modes and direction variants, each once, in their order."""
    return Space(loaded.adapter.n_layers, tuple(dict.fromkeys(settings.modes)), settings.gate,
                 tuple(dict.fromkeys(settings.direction_variants)))


def _directions(loaded: LoadedModel, variants: tuple[str, ...], source: str | PromptSet, progress: bool
                ) -> dict[str, DirectionSet]:
    """Each variant's directions, all from ``source`` (the prompts the search does not score), cached."""
    return {variant: get_directions(loaded, SteeringConfig(mode="ablate", direction_variant=variant), source=source,
                                    progress=progress) for variant in variants}


def _scorer(loaded: LoadedModel, settings: OptimizeSettings, prompts: _Prompts, baseline: Baseline,
            directions: dict[str, DirectionSet], space: Space) -> Scorer:
    """Screening on the search prompts, formatted as validation formats them (screening reads the first
    answer token, so a thinking model's prompts end after the thinking)."""
    thinking = evaluation_thinking(loaded, baseline.settings)
    texts = lambda items: answer_texts(loaded, thinking, items, settings.system)  # noqa: E731
    return Scorer(loaded, texts(prompts.search_harmful), texts(prompts.ordinary_train[:settings.search_size]),
                  texts(prompts.borderline_train[:settings.search_size]), settings.batch_size, directions,
                  space.gate_layers)


def _study_key(loaded: LoadedModel, settings: OptimizeSettings, directions_hash: str) -> str:
    """What makes a study resumable: the weights, the directions and every setting but the budget (the
    default variant alone leaves the key as it was before variants were searched, so old studies resume);
    with gates also the space's version (a study of an older space would feed the sampler trials it
    cannot read; a space without gates has not changed)."""
    default_variants = settings.direction_variants == ["mean_diff"]
    keyed = {**asdict(settings), "generation_batch_size": 32}  # the checks' decoding width changes no answer:
    # pinned at the value keys held before its default rose, so those studies resume
    space = {"space": SPACE_VERSION} if settings.gate else {}
    return stable_hash({"weights": loaded.info.weights_hash, "directions": directions_hash, **space,
                        "settings": {k: v for k, v in keyed.items() if k not in ("trials", "timeout", "resume")
                                     and not (k.startswith("thinking") and settings.thinking == "auto")
                                     and not (k == "direction_variants" and default_variants)}})


__all__ = ["OptimizeResult", "OptimizeSettings", "check_configurations", "check_settings", "choose",
           "config_from_params", "layer_weights", "optimize", "pick_finalists", "search_and_direction_sets",
           "search_on", "split", "train_val", "with_an_ungated_finalist"]

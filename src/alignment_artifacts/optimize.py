"""Automatic tuning: an Optuna search over ablation settings, refusals against KL.

The search covers two interventions on the refusal direction: ``ablate`` (bakeable into weights)
and ``clamp`` (ablation capped at a level between the harmless and harmful means, which leaves
harmless activations alone and so costs less KL; hooks only). It screens trials with cheap
proxies measured on a training split: the first-token refusal probability on harmful prompts
(one forward pass, no generation) and the first-token KL on harmless prompts, in bfloat16 where
the CPU multiplies it natively (about 2.5x faster; screening KLs agree with float32 within about
0.002); the direction is computed in that dtype too, from training prompts the trials are not
scored on. The Pareto front's finalists are then judged by real greedy generation on the same
split, and the chosen configuration is scored on a validation split that the search never saw
(with ``validate_all_finalists`` every finalist is generated on validation instead, so the
training-split check is skipped). Each generation also yields the first-token proxy on the same
prompts, which measures how well the proxy agrees. The study lives in
Optuna's SQLite storage, so an interrupted search resumes with ``--resume``.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .cache import atomic_write_json, cache_dir, stable_hash
from .errors import UserError
from .evaluation import (
    chat_texts,
    first_logits,
    generated_refusals,
    is_gated,
    kl_divergence,
    refusal_log_odds,
    refusal_opening_ids,
)
from .models.hooks import site_hooks
from .models.loading import LoadedModel, parameters_as, screening_dtype
from .prompts import PromptSet, resolve_prompts
from .steering import SteeringConfig, apply_steering, gate_passes

MIN_PER_SPLIT = 4
SEARCH_MODES = ("clamp", "ablate")


@dataclass
class OptimizeSettings:
    trials: int = 60
    timeout: float = 1800.0
    resume: bool = False
    seed: int = 0
    harmful: str = "harmful"
    harmless: str = "harmless"
    direction_prompts: str | None = None  # None: training prompts the search does not score; or "HARMFUL,HARMLESS"
    val_harmful: str | None = None  # explicit validation sets (else a split of harmful/harmless)
    val_harmless: str | None = None
    search_size: int = 32  # prompts of each kind scored per trial (at most half the training split by default)
    max_kl: float = 0.1
    modes: list[str] = field(default_factory=lambda: list(SEARCH_MODES))
    gate: bool = True  # clamp trials may also gate per prompt (steer only prompts past a projection at one layer)
    finalists: int = 4
    max_tokens: int = 48
    batch_size: int = 16
    generation_batch_size: int = 64  # decoding is memory-bound on CPUs: wide batches cost little more per step
    screen_dtype: str = "auto"  # dtype of the screening passes: auto (bfloat16 on CPUs with it), model, or a dtype
    system: str | None = None
    validate_all_finalists: bool = False  # score every finalist on the validation split (a validated front)


@dataclass
class OptimizeResult:
    model: str
    config: dict[str, Any]
    train: dict[str, Any]
    validation: dict[str, Any]
    pareto: list[dict[str, Any]]
    finalists: list[dict[str, Any]]
    proxy_agreement: float | None
    trials: int
    seconds: float
    stored_at: str
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        v, c = self.validation, self.config
        return "\n".join([
            f"optimize: {self.trials} trials in {self.seconds:.0f} s; Pareto front of {len(self.pareto)} points",
            f"chosen: mode={c['mode']} scale={c['scale']:.3f} direction_layer={c['direction_layer']}"
            + (f" clamp_level={c['clamp_level']:.3f}" if c["mode"] == "clamp" else "")
            + (f" gate_layer={c['gate_layer']} gate_level={c['gate_level']:.3f}" if c.get("gate_layer") is not None
               else ""),
            f"validation: refusals {v['refusals']}/{v['n_harmful']} (unmodified {v['baseline_refusals']}), "
            f"KL {v['kl_mean']:.4f}, over-refusal {v.get('over_refusals')}/{v['n_harmless']} "
            f"(unmodified {v.get('baseline_over_refusals')})",
            f"proxy/generation agreement on finalists: "
            f"{'n/a' if self.proxy_agreement is None else f'{self.proxy_agreement:.2f}'}",
            f"stored: {self.stored_at} (used by --mode auto)" + (f"\nplot: {self.plot}" if self.plot else ""),
        ])


def split(prompt_set: PromptSet, seed: int, name: str) -> tuple[PromptSet, PromptSet]:
    if len(prompt_set) < 2 * MIN_PER_SPLIT:
        raise UserError(f"The {name} prompt set has {len(prompt_set)} prompts; optimize needs at least "
                        f"{2 * MIN_PER_SPLIT} to hold out a validation split of {MIN_PER_SPLIT}.")
    order = list(range(len(prompt_set)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    pick = lambda rows: PromptSet(prompt_set.name, [prompt_set.prompts[i] for i in sorted(rows)])  # noqa: E731
    return pick(order[:half]), pick(order[half:])


def search_and_direction_sets(train_harmful: PromptSet, train_harmless: PromptSet,
                               settings: OptimizeSettings) -> tuple[PromptSet, PromptSet, str | PromptSet]:
    """Disjoint prompts for computing the direction and for scoring trials.

    A prompt the direction was computed from sits on its own side of the difference of means, so
    steering barely moves it: scored on such prompts, a trial's KL came out ten times lower than on
    unseen ones (measured on the builtin Qwen), and the search picked settings that were not cheap at all.
    """
    if settings.direction_prompts is None:  # the training split is cut in two: search prompts, direction prompts
        n_harmful = min(settings.search_size, len(train_harmful) // 2)
        n_harmless = min(settings.search_size, len(train_harmless) // 2)
        direction = PromptSet("optimize-direction", train_harmful.prompts[n_harmful:]
                              + train_harmless.prompts[n_harmless:])
        return (PromptSet(train_harmful.name, train_harmful.prompts[:n_harmful]),
                PromptSet(train_harmless.name, train_harmless.prompts[:n_harmless]), direction)
    source = settings.direction_prompts
    seen = set() if Path(source).is_dir() else set(resolve_prompts(source).texts)
    unseen = []
    for kind, prompt_set in (("harmful", train_harmful), ("harmless", train_harmless)):
        kept = [p for p in prompt_set.prompts if p.text not in seen][: settings.search_size]
        if len(kept) < MIN_PER_SPLIT:
            raise UserError(f"Only {len(kept)} of the {len(prompt_set)} {kind} training prompts are outside "
                            f"--direction-prompts; the search needs at least {MIN_PER_SPLIT} prompts the direction "
                            "was not computed from (on the direction's own prompts steering looks far cheaper than "
                            "it is). Give --harmful/--harmless sets that do not overlap the direction prompts.")
        unseen.append(PromptSet(prompt_set.name, kept))
    return unseen[0], unseen[1], source


def layer_weights(n_layers: int, centre: float, width: float, floor: float) -> dict[int, float]:
    """A triangular kernel over layers: 1 at the centre, falling to ``floor`` at ``width`` away."""
    return {layer: floor + (1 - floor) * max(0.0, 1 - abs(layer - centre) / width) for layer in range(n_layers)}


def config_from_params(params: dict[str, Any], n_layers: int, loaded: LoadedModel,
                       default_mode: str = "ablate") -> SteeringConfig:
    """The steering configuration a trial's parameters describe (scale names are per mode)."""
    mode = params.get("mode", default_mode)
    weights = layer_weights(n_layers, params["kernel_centre"], params["kernel_width"], params["kernel_floor"])
    scale = params.get(f"{mode}_scale", params.get("scale", 1.0))
    gated = bool(params.get("gated"))
    return SteeringConfig(mode=mode, scale=scale, direction_layer=params["direction_layer"],
                          clamp_level=params.get("clamp_level", 0.2), layer_weights=weights,
                          gate_layer=params["gate_layer"] if gated else None,
                          gate_level=params["gate_level"] if gated else 0.0,
                          model_id=loaded.info.name, weights_hash=loaded.info.weights_hash)


class _Scorer:
    """Proxy scores of a configuration on the training split.

    A gated configuration steers exactly as its ungated twin on the prompts its gate lets through
    and leaves the others bit-identical (tested in the steering tests), so a gated trial is scored
    as that: the twin on the prompts that pass, the unmodified model on the rest. The gate's
    decisions come from the unmodified model's last-token activations, captured once. Screening a
    gated trial therefore costs a fraction of an ungated one instead of two prefills per prompt.
    """

    def __init__(self, loaded: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int,
                 directions: Any, gate_layers: range):
        self.loaded, self.harmful, self.harmless, self.batch = loaded, harmful, harmless, batch_size
        self.directions, self.gate_layers = directions, gate_layers
        self.opening = refusal_opening_ids(loaded.tokenizer)
        self.base_harmless = first_logits(loaded, harmless, batch_size)
        self.base_odds = refusal_log_odds(first_logits(loaded, harmful, batch_size), self.opening)
        self.base_refusal = float(torch.sigmoid(self.base_odds).mean())
        self._last: dict[str, dict[int, torch.Tensor]] = {}

    def score(self, config: SteeringConfig) -> tuple[float, float, torch.Tensor]:
        """(mean refusal-opening probability, mean KL, per-prompt refusal log-odds)."""
        if config.gate_layer is None:
            with apply_steering(self.loaded, config, self.directions):
                odds = refusal_log_odds(first_logits(self.loaded, self.harmful, self.batch), self.opening)
                kl = kl_divergence(self.base_harmless, first_logits(self.loaded, self.harmless, self.batch))
            return float(torch.sigmoid(odds).mean()), float(kl.mean()), odds
        layer, level = config.gate_layer, config.gate_level
        harmful_rows = self._passing("harmful", self.harmful, layer, level)
        harmless_rows = self._passing("harmless", self.harmless, layer, level)
        odds, kl = self.base_odds.clone(), torch.zeros(len(self.harmless))
        with apply_steering(self.loaded, replace(config, gate_layer=None), self.directions):
            if harmful_rows:
                logits = first_logits(self.loaded, [self.harmful[i] for i in harmful_rows], self.batch)
                odds[harmful_rows] = refusal_log_odds(logits, self.opening)
            if harmless_rows:
                logits = first_logits(self.loaded, [self.harmless[i] for i in harmless_rows], self.batch)
                kl[harmless_rows] = kl_divergence(self.base_harmless[harmless_rows], logits)
        return float(torch.sigmoid(odds).mean()), float(kl.mean()), odds

    def _passing(self, name: str, texts: list[str], layer: int, level: float) -> list[int]:
        if name not in self._last:  # the unmodified last-token activations at every candidate gate layer
            site = self.directions.site
            captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.gate_layers}
            hooks = {(site, layer): (lambda h, kept=kept: kept.append(h[:, -1].float().cpu()))
                     for layer, kept in captured.items()}
            with site_hooks(self.loaded.adapter, hooks):
                first_logits(self.loaded, texts, self.batch, whole=True)  # the path a gate decides on
            self._last[name] = {layer: torch.cat(kept) for layer, kept in captured.items()}
        return gate_passes(self.directions, layer, level, self._last[name][layer]).nonzero().flatten().tolist()


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


def optimize(loaded: LoadedModel, settings: OptimizeSettings | None = None, progress: bool = True) -> OptimizeResult:
    """Search steering settings, pick a configuration, validate it, and store it for ``auto``."""
    from .api import config_path, get_directions

    settings = settings or OptimizeSettings()
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
    started = time.perf_counter()
    harmful_all = resolve_prompts(settings.harmful, label=1)
    harmless_all = resolve_prompts(settings.harmless, label=0)
    if settings.val_harmful and settings.val_harmless:
        train_harmful, val_harmful = harmful_all, resolve_prompts(settings.val_harmful, label=1)
        train_harmless, val_harmless = harmless_all, resolve_prompts(settings.val_harmless, label=0)
    else:
        train_harmful, val_harmful = split(harmful_all, settings.seed, "harmful")
        train_harmless, val_harmless = split(harmless_all, settings.seed, "harmless")
    n_layers = loaded.adapter.n_layers
    search_set_harmful, search_set_harmless, direction_source = search_and_direction_sets(
        train_harmful, train_harmless, settings)
    screen = screening_dtype(loaded, settings.screen_dtype)
    with parameters_as(loaded, screen):  # a mean over many prompts: screening precision is plenty, and 2.5x faster
        directions = get_directions(loaded, SteeringConfig(mode="ablate"), source=direction_source,
                                    progress=progress)
    search_harmful = chat_texts(loaded, search_set_harmful, settings.system)
    search_harmless = chat_texts(loaded, search_set_harmless, settings.system)
    modes = list(dict.fromkeys(settings.modes))
    key = stable_hash({"weights": loaded.info.weights_hash, "settings": {k: v for k, v in asdict(settings).items()
                                                                         if k not in ("trials", "timeout",
                                                                                      "resume")},
                       "directions": directions.prompt_set_hash})
    seeds = _seed_trials(modes, n_layers, settings.gate)
    study = _study(loaded, settings, key, n_startup=len(seeds) + 4)
    lo, hi = max(1, round(0.25 * n_layers)), min(n_layers - 1, round(0.85 * n_layers))
    gate_layers = range(round(0.5 * n_layers), min(n_layers - 1, round(0.85 * n_layers)) + 1)
    to_config = lambda params: config_from_params(params, n_layers, loaded, modes[0])  # noqa: E731

    def objective(trial: Any) -> tuple[float, float]:
        mode = trial.suggest_categorical("mode", modes) if len(modes) > 1 else modes[0]
        params: dict[str, Any] = {"direction_layer": trial.suggest_int("direction_layer", lo, hi)}
        if mode == "clamp":
            params["clamp_scale"] = trial.suggest_float("clamp_scale", 0.5, 2.0)
            params["clamp_level"] = trial.suggest_float("clamp_level", -0.2, 0.8)
            if settings.gate and trial.suggest_categorical("gated", [False, True]):
                params.update(gated=True, gate_layer=trial.suggest_int("gate_layer", gate_layers[0], gate_layers[-1]),
                              gate_level=trial.suggest_float("gate_level", -0.2, 0.4))
        else:  # beyond ~1.2 ablation flips the projection's sign, and KL on unseen prompts jumps
            params["ablate_scale"] = trial.suggest_float("ablate_scale", 0.3, 1.2)
        params.update(kernel_centre=trial.suggest_float("kernel_centre", 0, n_layers - 1),
                      kernel_width=trial.suggest_float("kernel_width", 2, n_layers),
                      kernel_floor=trial.suggest_float("kernel_floor", 0.0, 1.0))
        refusal, kl, odds = scorer.score(to_config({"mode": mode, **params}))
        trial.set_user_attr("kl", kl)
        trial.set_user_attr("refusal_prob", refusal)
        trial.set_user_attr("proxy_refusals", [bool(x) for x in (odds > 0).tolist()])
        return refusal, kl

    # the unmodified side of validation runs first: its duration prices every later validation, so the
    # search gets what is left of --timeout after the finalists' checks and validations
    validator = _Validator(loaded, directions, val_harmful, val_harmless, settings)
    n_validated = settings.finalists if settings.validate_all_finalists else 1
    check = 0.0 if settings.validate_all_finalists else (
        validator.seconds * len(search_harmful) / max(1, len(validator.harmful)) * (0.5 if screen else 1.0))
    reserve = validator.seconds * (n_validated + 0.25) + validator.over_seconds + check * settings.finalists
    search_budget = settings.timeout - (time.perf_counter() - started) - reserve
    if search_budget < 60:
        warnings.warn(f"--timeout {settings.timeout:g} s leaves {max(search_budget, 0):.0f} s for the search after "
                      f"validation (about {reserve:.0f} s); running a few trials anyway. Raise --timeout.",
                      stacklevel=2)
        search_budget = 60.0
    with parameters_as(loaded, screen):
        scorer = _Scorer(loaded, search_harmful, search_harmless, settings.batch_size, directions, gate_layers)
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
        finalists = _pick_finalists(pareto, settings, scorer.base_refusal)
        finalist_rows, agreements = [], []
        for trial in finalists:
            config = to_config(trial.params)
            proxy_flags = trial.user_attrs.get("proxy_refusals")
            if proxy_flags is None:  # a trial from a study stored before per-prompt flags were kept
                proxy_flags = (scorer.score(config)[2] > 0).tolist()
            row = {"trial": trial.number, "mode": config.mode, "params": trial.params, "n": len(proxy_flags),
                   "refusals": sum(proxy_flags), "judged_by": "first-token proxy", "kl": trial.user_attrs["kl"],
                   "refusal_prob": trial.user_attrs["refusal_prob"]}
            if not settings.validate_all_finalists:  # one will be validated: judge them by generation first
                with apply_steering(loaded, config, directions):
                    flags = generated_refusals(loaded, search_harmful, settings.max_tokens,
                                               settings.generation_batch_size).flags
                agreements.append(sum(a == b for a, b in zip(flags, proxy_flags)) / len(flags))
                row.update(refusals=sum(flags), judged_by="generation")
            finalist_rows.append(row)
    within = [r for r in finalist_rows if r["kl"] <= settings.max_kl] or finalist_rows
    best = min(within, key=lambda r: (r["refusals"], r["kl"]))
    config = to_config(best["params"])
    config.notes = {"optimize": {"trial": best["trial"], "study": study.study_name}}
    path = config_path(loaded)
    # the stored configuration points at a copy of the very directions the search used
    config.source = str(directions.save(path.with_name(path.stem + ".directions")))
    validation = validator(config)
    best["validation"] = validation
    if settings.validate_all_finalists:  # every finalist is generated on validation: no training-split check needed
        for row in finalist_rows:
            if row is not best:
                row["validation"] = validator(to_config(row["params"]), over_refusal=False)
    agreements += [row["validation"]["proxy_agreement"] for row in finalist_rows if "validation" in row]
    plot = _plot_pareto(complete, pareto, finalist_rows, cache_dir("studies", f"{study.study_name}.png"))
    atomic_write_json(path, {"config": config.to_json(), "validation": validation, "finalists": finalist_rows,
                             "pareto": [_trial_row(t) for t in pareto], "study": study.study_name,
                             "screen_dtype": str(screen or loaded.info.dtype),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return OptimizeResult(model=loaded.info.name, config=config.to_json(), train=best, validation=validation,
                          pareto=[_trial_row(t) for t in pareto], finalists=finalist_rows,
                          proxy_agreement=sum(agreements) / len(agreements) if agreements else None,
                          trials=len(complete), seconds=round(time.perf_counter() - started, 1),
                          stored_at=str(path), plot=plot)


def _seed_trials(modes: list[str], n_layers: int, gate: bool) -> list[dict[str, Any]]:
    """Known-good starting points: the plain recipe (full ablation with one layer's direction),
    clamps at three levels, which sketch the whole trade-off before the sampler takes over, and
    (with ``gate``) the level-0 clamp gated at two levels, where the low-refusal end is cheapest."""
    flat = {"direction_layer": round(0.6 * n_layers), "kernel_centre": n_layers / 2, "kernel_width": float(n_layers),
            "kernel_floor": 1.0}
    ungated = {"gated": False} if gate else {}
    clamps = [{"clamp_scale": 1.0, "clamp_level": level, **ungated} for level in (0.0, 0.2, 0.4)]
    if gate:
        clamps += [{"clamp_scale": 1.0, "clamp_level": 0.0, "gated": True, "gate_layer": round(0.75 * n_layers),
                    "gate_level": level} for level in (0.1, 0.2)]
    seeds = {"ablate": [{"ablate_scale": 1.0}], "clamp": clamps}
    tag = lambda mode: {"mode": mode} if len(modes) > 1 else {}  # noqa: E731
    return [{**tag(mode), **flat, **params} for mode in modes for params in seeds[mode]]


def _trial_row(trial: Any) -> dict[str, Any]:
    return {"trial": trial.number, "refusal_prob": trial.values[0], "kl": trial.values[1], "params": trial.params,
            "proxy_refusals": sum(trial.user_attrs.get("proxy_refusals", []))}


def _pick_finalists(pareto: list[Any], settings: OptimizeSettings, base_refusal: float) -> list[Any]:
    """Up to ``finalists`` Pareto points inside the KL budget, spread evenly over log KL.

    Fronts crowd at the low-refusal end (many points with no proxy refusals and rising KL), so an
    even spread in KL, not in front order, is what covers the trade-off. Points that keep more than
    half the unmodified refusal probability are left out: they are nearly free but barely steer.
    """
    inside = [t for t in pareto if t.values[1] <= settings.max_kl and t.values[0] <= base_refusal / 2] \
        or [t for t in pareto if t.values[1] <= settings.max_kl] or pareto[:1]
    if len(inside) <= settings.finalists:
        return inside
    logs = {t.number: math.log(max(t.values[1], 1e-6)) for t in inside}
    low, high = min(logs.values()), max(logs.values())
    chosen: list[Any] = []
    for i in range(settings.finalists):
        target = low + (high - low) * i / max(1, settings.finalists - 1)
        chosen.append(min((t for t in inside if t not in chosen), key=lambda t: abs(logs[t.number] - target)))
    return sorted(chosen, key=lambda t: t.values[0])


class _Validator:
    """Real metrics on prompts the search never saw; the unmodified side is computed once."""

    def __init__(self, loaded: LoadedModel, directions: Any, harmful: PromptSet, harmless: PromptSet,
                 settings: OptimizeSettings):
        self.loaded, self.directions, self.settings = loaded, directions, settings
        self.opening = refusal_opening_ids(loaded.tokenizer)
        self.harmful = chat_texts(loaded, harmful, settings.system)
        self.harmless = chat_texts(loaded, harmless, settings.system)
        started = time.perf_counter()
        self.base_flags = generated_refusals(loaded, self.harmful, settings.max_tokens,
                                             settings.generation_batch_size).flags
        generated = time.perf_counter()
        self.base_logits = {False: first_logits(loaded, self.harmless, settings.batch_size)}
        self.seconds = time.perf_counter() - started  # what validating one configuration costs
        if settings.gate and "clamp" in settings.modes:  # gated finalists cost more: price them now
            whole_started = time.perf_counter()
            self.base_logits[True] = first_logits(loaded, self.harmless, settings.batch_size, whole=True)
            # decision passes (up to 85% of a prefill) on top of generation and of the unshared KL pass
            gated = (generated - started) * 1.2 + (time.perf_counter() - whole_started) * 1.85
            self.seconds = max(self.seconds, gated)
        over_started = time.perf_counter()
        self.base_over = generated_refusals(loaded, self.harmless, settings.max_tokens,
                                            settings.generation_batch_size).flags
        self.over_seconds = time.perf_counter() - over_started  # the chosen one's over-refusal check

    def __call__(self, config: SteeringConfig, over_refusal: bool = True) -> dict[str, Any]:
        s, whole = self.settings, is_gated(config)
        if whole not in self.base_logits:  # a gated configuration's baseline takes its path (see first_logits)
            self.base_logits[whole] = first_logits(self.loaded, self.harmless, s.batch_size, whole)
        with apply_steering(self.loaded, config, self.directions):
            flags, broad, _, first = generated_refusals(self.loaded, self.harmful, s.max_tokens,
                                                        s.generation_batch_size)
            logits = first_logits(self.loaded, self.harmless, s.batch_size)
            over = generated_refusals(self.loaded, self.harmless, s.max_tokens, s.generation_batch_size).flags \
                if over_refusal else None
        kl = kl_divergence(self.base_logits[whole], logits)
        proxy = (refusal_log_odds(first, self.opening) > 0).tolist()
        return {"n_harmful": len(flags), "refusals": sum(flags), "baseline_refusals": sum(self.base_flags),
                "proxy_refusals": sum(proxy), "proxy_agreement": sum(a == b for a, b in zip(flags, proxy)) / len(flags),
                "broad_marker_hits": sum(broad), "n_harmless": len(self.harmless), "kl_mean": float(kl.mean()),
                "kl_median": float(kl.median()), "over_refusals": None if over is None else sum(over),
                "baseline_over_refusals": sum(self.base_over)}


def _plot_pareto(trials: list[Any], pareto: list[Any], finalists: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=12, c="#bbb", label="trials")
    ax.plot([t.values[1] for t in pareto], [t.values[0] for t in pareto], "o-", c="#c44", ms=4,
            label="Pareto front")
    ax.scatter([r["kl"] for r in finalists], [r["refusal_prob"] for r in finalists], s=60, facecolors="none",
               edgecolors="k", label="finalists (generation-checked)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(original || steered), harmless (first token)")
    ax.set_ylabel("refusal-opening probability, harmful")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


__all__ = ["OptimizeResult", "OptimizeSettings", "optimize"]

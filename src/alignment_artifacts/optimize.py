"""Automatic tuning: an Optuna search over ablation settings, refusals against KL.

The search screens trials with cheap proxies measured on a training split: the first-token
refusal probability on harmful prompts (one forward pass, no generation) and the first-token KL
on harmless prompts. The Pareto front's finalists are then judged by real greedy generation on
the same split (which also measures how well the proxy agrees with generation), and the chosen
configuration is scored on a validation split that the search never saw. The study lives in
Optuna's SQLite storage, so an interrupted search resumes with ``--resume``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import atomic_write_json, cache_dir, stable_hash
from .errors import UserError
from .evaluation import (
    first_logits,
    generated_refusals,
    kl_divergence,
    refusal_log_odds,
    refusal_opening_ids,
)
from .models.generation import format_chat
from .models.loading import LoadedModel
from .prompts import PromptSet, resolve_prompts
from .steering import SteeringConfig, apply_steering

MIN_PER_SPLIT = 4


@dataclass
class OptimizeSettings:
    trials: int = 60
    timeout: float = 1800.0
    resume: bool = False
    seed: int = 0
    harmful: str = "harmful"
    harmless: str = "harmless"
    direction_prompts: str = "instructions"  # builtin set, or "HARMFUL_FILE,HARMLESS_FILE"
    val_harmful: str | None = None  # explicit validation sets (else a split of harmful/harmless)
    val_harmless: str | None = None
    search_size: int = 32  # prompts of each kind scored per trial
    max_kl: float = 0.1
    modes: list[str] = field(default_factory=lambda: ["ablate"])
    finalists: int = 4
    max_tokens: int = 48
    batch_size: int = 16
    system: str | None = None
    finalist_reserve: float = 0.3  # share of the time budget kept for finalists and validation
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
            f"chosen: mode={c['mode']} scale={c['scale']:.3f} direction_layer={c['direction_layer']}",
            f"validation: refusals {v['refusals']}/{v['n_harmful']} (unmodified {v['baseline_refusals']}), "
            f"KL {v['kl_mean']:.4f}, over-refusal {v.get('over_refusals')}/{v['n_harmless']}",
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


def layer_weights(n_layers: int, centre: float, width: float, floor: float) -> dict[int, float]:
    """A triangular kernel over layers: 1 at the centre, falling to ``floor`` at ``width`` away."""
    return {layer: floor + (1 - floor) * max(0.0, 1 - abs(layer - centre) / width) for layer in range(n_layers)}


def config_from_params(params: dict[str, Any], n_layers: int, loaded: LoadedModel) -> SteeringConfig:
    weights = layer_weights(n_layers, params["kernel_centre"], params["kernel_width"], params["kernel_floor"])
    return SteeringConfig(mode="ablate", scale=params["scale"], direction_layer=params["direction_layer"],
                          layer_weights=weights, model_id=loaded.info.name, weights_hash=loaded.info.weights_hash)


class _Scorer:
    """Proxy scores of a configuration on the training split."""

    def __init__(self, loaded: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int):
        self.loaded, self.harmful, self.harmless, self.batch = loaded, harmful, harmless, batch_size
        self.opening = refusal_opening_ids(loaded.tokenizer)
        self.base_harmless = first_logits(loaded, harmless, batch_size)

    def score(self, config: SteeringConfig, directions: Any) -> tuple[float, float, torch.Tensor]:
        with apply_steering(self.loaded, config, directions):
            harmful_logits = first_logits(self.loaded, self.harmful, self.batch)
            harmless_logits = first_logits(self.loaded, self.harmless, self.batch)
        odds = refusal_log_odds(harmful_logits, self.opening)
        kl = kl_divergence(self.base_harmless, harmless_logits)
        return float(torch.sigmoid(odds).mean()), float(kl.mean()), odds


def _study(loaded: LoadedModel, settings: OptimizeSettings, key: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = cache_dir("studies")
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / (loaded.info.name.replace('/', '--') + '.db')}"
    name = f"{loaded.info.name}-{key}"
    if not settings.resume:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True,
                                         n_startup_trials=max(4, min(12, settings.trials // 3)))
    return optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                               sampler=sampler, load_if_exists=True)


def optimize(loaded: LoadedModel, settings: OptimizeSettings | None = None, progress: bool = True) -> OptimizeResult:
    """Search ablation settings, pick a configuration, validate it, and store it for ``auto``."""
    from .api import config_path, get_directions

    settings = settings or OptimizeSettings()
    if settings.modes != ["ablate"]:
        raise UserError("optimize searches mode 'ablate' (the bakeable, exportable intervention); other modes are "
                        "tuned by hand with `evaluate`. Use --modes ablate.")
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
    directions = get_directions(loaded, SteeringConfig(mode="ablate", source=settings.direction_prompts),
                                progress=progress)
    fmt = lambda ps: [format_chat(loaded.tokenizer, p.text, settings.system) for p in ps.prompts]  # noqa: E731
    search_harmful = fmt(train_harmful)[: settings.search_size]
    search_harmless = fmt(train_harmless)[: settings.search_size]
    scorer = _Scorer(loaded, search_harmful, search_harmless, settings.batch_size)
    key = stable_hash({"weights": loaded.info.weights_hash, "settings": {k: v for k, v in asdict(settings).items()
                                                                         if k not in ("trials", "timeout",
                                                                                      "resume")},
                       "directions": directions.prompt_set_hash})
    study = _study(loaded, settings, key)
    lo, hi = max(1, round(0.25 * n_layers)), min(n_layers - 1, round(0.85 * n_layers))

    def objective(trial: Any) -> tuple[float, float]:
        params = {
            "direction_layer": trial.suggest_int("direction_layer", lo, hi),
            "scale": trial.suggest_float("scale", 0.3, 1.6),
            "kernel_centre": trial.suggest_float("kernel_centre", 0, n_layers - 1),
            "kernel_width": trial.suggest_float("kernel_width", 2, n_layers),
            "kernel_floor": trial.suggest_float("kernel_floor", 0.0, 1.0),
        }
        refusal, kl, _ = scorer.score(config_from_params(params, n_layers, loaded), directions)
        trial.set_user_attr("kl", kl)
        trial.set_user_attr("refusal_prob", refusal)
        return refusal, kl

    search_budget = max(10.0, settings.timeout * (1 - settings.finalist_reserve) - (time.perf_counter() - started))
    done = len([t for t in study.trials if t.state.name == "COMPLETE"])
    remaining = max(0, settings.trials - done)
    if remaining:
        if not done:  # seed the search with the plain recipe: full ablation with one layer's direction
            study.enqueue_trial({"direction_layer": round(0.6 * n_layers), "scale": 1.0,
                                 "kernel_centre": n_layers / 2, "kernel_width": float(n_layers),
                                 "kernel_floor": 1.0})
        study.optimize(objective, n_trials=remaining, timeout=search_budget, show_progress_bar=progress,
                       gc_after_trial=False)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError("No trial finished within the time budget; raise --timeout.")
    pareto = sorted(study.best_trials, key=lambda t: t.values[0])
    finalists = _pick_finalists(pareto, settings)
    finalist_rows, agreements = [], []
    for trial in finalists:
        config = config_from_params(trial.params, n_layers, loaded)
        with apply_steering(loaded, config, directions):
            flags, _, _ = generated_refusals(loaded, search_harmful, settings.max_tokens, settings.batch_size)
        _, _, odds = scorer.score(config, directions)
        proxy_flags = (odds > 0).tolist()
        agreements.append(sum(a == b for a, b in zip(flags, proxy_flags)) / len(flags))
        finalist_rows.append({"trial": trial.number, "params": trial.params, "refusals": sum(flags),
                              "n": len(flags), "kl": trial.user_attrs["kl"],
                              "refusal_prob": trial.user_attrs["refusal_prob"]})
    within = [r for r in finalist_rows if r["kl"] <= settings.max_kl] or finalist_rows
    best = min(within, key=lambda r: (r["refusals"], r["kl"]))
    config = config_from_params(best["params"], n_layers, loaded)
    config.notes = {"optimize": {"trial": best["trial"], "study": study.study_name}}
    validator = _Validator(loaded, directions, val_harmful, val_harmless, settings)
    validation = validator(config)
    if settings.validate_all_finalists:
        for row in finalist_rows:
            row["validation"] = validation if row is best else validator(
                config_from_params(row["params"], n_layers, loaded), over_refusal=False)
    plot = _plot_pareto(complete, pareto, finalist_rows, cache_dir("studies", f"{study.study_name}.png"))
    path = config_path(loaded)
    atomic_write_json(path, {"config": config.to_json(), "validation": validation, "finalists": finalist_rows,
                             "pareto": [_trial_row(t) for t in pareto], "study": study.study_name,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return OptimizeResult(model=loaded.info.name, config=config.to_json(), train=best, validation=validation,
                          pareto=[_trial_row(t) for t in pareto], finalists=finalist_rows,
                          proxy_agreement=sum(agreements) / len(agreements) if agreements else None,
                          trials=len(complete), seconds=round(time.perf_counter() - started, 1),
                          stored_at=str(path), plot=plot)


def _trial_row(trial: Any) -> dict[str, Any]:
    return {"trial": trial.number, "refusal_prob": trial.values[0], "kl": trial.values[1], "params": trial.params}


def _pick_finalists(pareto: list[Any], settings: OptimizeSettings) -> list[Any]:
    """Up to ``finalists`` Pareto points inside the KL budget, spread from fewest refusals upward."""
    inside = [t for t in pareto if t.values[1] <= settings.max_kl] or pareto[:1]
    if len(inside) <= settings.finalists:
        return inside
    step = (len(inside) - 1) / (settings.finalists - 1)
    return [inside[round(i * step)] for i in range(settings.finalists)]


class _Validator:
    """Real metrics on prompts the search never saw; the unmodified side is computed once."""

    def __init__(self, loaded: LoadedModel, directions: Any, harmful: PromptSet, harmless: PromptSet,
                 settings: OptimizeSettings):
        fmt = lambda ps: [format_chat(loaded.tokenizer, p.text, settings.system) for p in ps.prompts]  # noqa: E731
        self.loaded, self.directions, self.settings = loaded, directions, settings
        self.harmful, self.harmless = fmt(harmful), fmt(harmless)
        self.base_flags, _, _ = generated_refusals(loaded, self.harmful, settings.max_tokens, settings.batch_size)
        self.base_logits = first_logits(loaded, self.harmless, settings.batch_size)

    def __call__(self, config: SteeringConfig, over_refusal: bool = True) -> dict[str, Any]:
        s = self.settings
        with apply_steering(self.loaded, config, self.directions):
            flags, broad, _ = generated_refusals(self.loaded, self.harmful, s.max_tokens, s.batch_size)
            logits = first_logits(self.loaded, self.harmless, s.batch_size)
            over = generated_refusals(self.loaded, self.harmless, s.max_tokens, s.batch_size)[0] if over_refusal \
                else None
        kl = kl_divergence(self.base_logits, logits)
        return {"n_harmful": len(flags), "refusals": sum(flags), "baseline_refusals": sum(self.base_flags),
                "broad_marker_hits": sum(broad), "n_harmless": len(self.harmless), "kl_mean": float(kl.mean()),
                "kl_median": float(kl.median()), "over_refusals": None if over is None else sum(over)}


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

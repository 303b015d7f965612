"""The storage step: the chosen configuration, the very directions the search used, and every number
behind the choice go to ``configs/<model>.json``, which ``--mode auto`` reads; a plot of the front
goes next to the study."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.directions import DirectionSet
from ..cache import atomic_write_json, cache_dir, cache_root
from ..models.loading import LoadedModel
from ..resolve import config_path
from ..steering import SteeringConfig
from .search import Searched


@dataclass
class Stored:
    config: SteeringConfig
    path: Path
    pareto: list[dict[str, Any]]  # one row per Pareto trial
    plot: str | None


def store(loaded: LoadedModel, searched: Searched, finalists: list[dict[str, Any]], best: dict[str, Any],
          directions: dict[str, DirectionSet], judge_name: str, screen_dtype: str) -> Stored:
    """Write the choice for ``--mode auto`` with its own variant's directions (of ``directions``, one set per
    variant searched); they are named relative to the cache root when they are inside it, so moving the
    cache (or ``--cache-dir``) keeps the configuration usable."""
    study = searched.study
    config = SteeringConfig.from_json(best["config"])
    config.notes = {"optimize": {"trial": best["trial"], "study": study.study_name}}
    path = config_path(loaded)
    saved = directions[config.direction_variant].save(path.with_name(path.stem + ".directions"))
    config.source = str(Path(saved).relative_to(cache_root())) if Path(saved).is_relative_to(cache_root()) \
        else str(saved)
    plot = _plot_pareto(searched.complete, searched.pareto, finalists,
                        cache_dir("studies", f"{study.study_name}.png"))
    pareto_rows = [_trial_row(t) for t in searched.pareto]
    atomic_write_json(path, {"config": config.to_json(), "judge": judge_name, "validation": best["validation"],
                             "finalists": finalists, "pareto": pareto_rows, "study": study.study_name,
                             "screen_dtype": screen_dtype, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return Stored(config, path, pareto_rows, plot)


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

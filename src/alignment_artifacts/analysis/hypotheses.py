"""The seed study's two hypotheses, tested on an analysis with the same resamples as its numbers.

H1 (early MLP layers carry the strongest artifacts) and H2 (political neutrality carries stronger
artifacts than the harmlessness categories) are claims of the study this toolkit started from.
Each is a difference of held-out effect sizes with a pair-bootstrap interval; ``supported`` is
``None`` wherever the analysis cannot test the claim (missing layers, categories or site).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .stats import interval

H2_CATEGORY = "social_political"


def seed_hypotheses(site: str, layers: Sequence[int], recommended: Sequence[int], pooled: str,
                    heldout_g: dict[str, dict[int, float]], replicates: dict[str, dict[int, np.ndarray]], *,
                    level: float, n_bootstrap: int) -> dict[str, Hypothesis]:
    """H1 on the pooled source over all ``layers``, H2 across the categories at the ``recommended`` layers.

    ``heldout_g[source][layer]`` is a cell's held-out g and ``replicates[source][layer]`` its [B] refit
    bootstrap replicates; ``pooled`` names the source of all prompts, every other source is a category.
    """
    categories = [c for c in heldout_g if c != pooled]
    target = H2_CATEGORY if H2_CATEGORY in categories else next(
        (c for c in categories if "politic" in c), H2_CATEGORY)
    return {
        "H1": early_layer_hypothesis(
            layers, [heldout_g[pooled][layer] for layer in layers],
            np.stack([replicates[pooled][layer] for layer in layers], axis=1), site=site, level=level),
        "H2": category_hypothesis(
            target, {c: [heldout_g[c][layer] for layer in recommended] for c in categories},
            {c: np.stack([replicates[c][layer] for layer in recommended], axis=1) if recommended
             else np.zeros((n_bootstrap, 0)) for c in categories},
            layers=recommended, level=level),
    }


@dataclass(frozen=True)
class Hypothesis:
    claim: str
    estimate: float | None
    ci: tuple[float, float] | None
    supported: bool | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci": list(self.ci) if self.ci is not None else None}


def _finite_ci(estimate: float, replicates: np.ndarray, level: float) -> tuple[float, float] | None:
    low, high = interval(estimate, replicates, None, level, "centred")
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def early_layer_hypothesis(layers: Sequence[int], estimates: Sequence[float], replicates: np.ndarray, *,
                           site: str, early: Sequence[int] = range(1, 7), level: float = 0.95) -> Hypothesis:
    """H1: the mean held-out g over early layers exceeds that over all other layers.

    ``estimates`` [L] are held-out g per layer; ``replicates`` [B, L] their bootstrap replicates
    from one shared set of pair resamples, so the layer-to-layer correlation is kept.
    """
    claim = "Early MLP layers (1–6) show the strongest artifacts."
    layers, early = list(layers), list(early)
    in_early = np.isin(layers, early)
    if len(layers) < 7 or in_early.sum() < len(early) or in_early.all():
        return Hypothesis(claim, None, None, None, f"Needs layers {min(early)}–{max(early)} and at least one "
                          f"other layer; this analysis has {len(layers)} layer(s): {layers}.")
    g, reps = np.asarray(estimates, dtype=np.float64), np.asarray(replicates, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        estimate = float(np.nanmean(g[in_early]) - np.nanmean(g[~in_early]))
        diff = np.nanmean(reps[:, in_early], 1) - np.nanmean(reps[:, ~in_early], 1)
    ci = _finite_ci(estimate, diff, level)
    note = (f"Mean held-out g over layers {min(early)}–{max(early)} minus mean over the other "
            f"{int((~in_early).sum())} layers; {level:.0%} pair-bootstrap CI (directions refitted in every "
            "resample, centred on the estimate).")
    if site != "mlp_out":
        return Hypothesis(claim, estimate, ci, None, note + f" Not tested: the site analysed is '{site}', "
                          "the claim is about mlp_out.")
    return Hypothesis(claim, estimate, ci, None if ci is None else bool(ci[0] > 0), note)


def category_hypothesis(target: str, estimates: dict[str, Sequence[float]], replicates: dict[str, np.ndarray],
                        *, layers: Sequence[int], level: float = 0.95) -> Hypothesis:
    """H2: ``target``'s held-out g exceeds the mean of the other categories at ``layers``.

    ``estimates[c]`` [len(layers)] and ``replicates[c]`` [B, len(layers)] per category; categories
    are independent samples resampled on their own, so replicates are combined index by index.
    """
    claim = "Political neutrality (social_political) shows stronger artifacts than harmlessness categories."
    others = [c for c in estimates if c != target]
    if target not in estimates or not others:
        return Hypothesis(claim, None, None, None, f"Needs the category '{target}' and at least one other; "
                          f"categories analysed: {sorted(estimates) or 'none'}.")
    if not layers:
        return Hypothesis(claim, None, None, None, "No recommended layers to compare at.")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        point = {c: float(np.nanmean(estimates[c])) for c in estimates}
        boot = {c: np.nanmean(np.asarray(replicates[c], dtype=np.float64), axis=1) for c in estimates}
    estimate = point[target] - float(np.mean([point[c] for c in others]))
    diff = boot[target] - np.mean([boot[c] for c in others], axis=0)
    ci = _finite_ci(estimate, diff, level)
    note = (f"Mean held-out g of '{target}' minus the mean over {', '.join(others)} at layers "
            f"{list(layers)}; {level:.0%} bootstrap CI resampling pairs within each category "
            "(directions refitted, centred on the estimate).")
    return Hypothesis(claim, estimate, ci, None if ci is None else bool(ci[0] > 0), note)

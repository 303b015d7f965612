"""The finalist check: a few Pareto points, evaluated like ``evaluate`` does, and the choice among them.

Finalists are spread over the cost axis of the front (one of them ungated when the search tried
both; a single one is the cheapest point whose refusal proxy is the plain recipe's, or lower) and
checked on the validation splits of all four groups, in the model's dtype, with the judge. The
choice is the fewest harmful prompts not complied with, then the fewest refused, then the lowest
validated cost, among finalists whose capability held.

A check's numbers (counts, rates, divergences, the judge's label per harmful prompt; never an answer)
are kept beside the baseline it was measured against, keyed by everything they depend on, so
``--resume`` after an interruption, or a later run that picks the same finalist, reads a check
instead of running it again (about as long as the baseline on a CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from ..analysis.directions import DirectionSet
from ..cache import atomic_write_json
from ..evaluation import Baseline
from ..evaluation.groups import evaluate_against, steered_key
from ..evaluation.results import result_from_json
from ..models.loading import LoadedModel
from ..steering import Steering
from .search import Searched, Space

# refusal proxies closer than this are a tie for a single finalist slot (on 32 search prompts one prompt
# that flips moves the proxy by up to 0.03)
REFUSAL_TIE = 0.01


def check_finalists(loaded: LoadedModel, searched: Searched, space: Space, directions: dict[str, DirectionSet],
                    baseline: Baseline, *, n: int, max_cost: float, base_refusal: float, max_capability_drop: float,
                    plain_recipe: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every finalist's row (trial, parameters, proxies, configuration, four validated groups, and whether
    they were ``reused`` from an earlier run's check) and the chosen one; with ``plain_recipe`` the plain
    recipe is checked too, as a reference row that is never chosen. ``directions``: one set per direction
    variant searched."""
    finalists = []
    for trial in with_an_ungated_finalist(searched, n, max_cost, base_refusal):
        config = space.config(trial.params, loaded)
        validation, reused = checked(loaded, Steering(config, directions[config.direction_variant]), baseline)
        finalists.append({"trial": trial.number, "params": trial.params, "refusal_prob": trial.values[0],
                          "cost": trial.values[1], "config": config.to_json(), "validation": validation,
                          "reused": reused})
    best = choose(finalists, max_capability_drop)
    if plain_recipe:
        plain = space.config(space.plain_recipe(), loaded)  # with the first variant searched
        validation, reused = checked(loaded, Steering(plain, directions[plain.direction_variant]), baseline)
        finalists.append({"trial": None, "reference": "plain recipe", "params": space.plain_recipe(),
                          "config": plain.to_json(), "validation": validation, "reused": reused})
    return finalists, best


def check_path(baseline: Baseline, steering: Steering) -> Path:
    """Where the check of ``steering`` against ``baseline`` is kept, keyed by all it depends on
    (``groups.steered_key``: a change to how a steered side is measured bumps its version)."""
    return baseline.folder / "checks" / f"{steered_key(baseline, steering)}.json"


def kept_check(path: Path) -> dict[str, Any] | None:
    """The check kept at ``path``, or None if there is none or it is damaged (then it is measured again)."""
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        stored = json.loads(path.read_text())
        result_from_json(stored)  # whole, as the choice and the stored configuration read it
        return stored
    return None


def checked(loaded: LoadedModel, steering: Steering, baseline: Baseline) -> tuple[dict[str, Any], bool]:
    """``steering``'s four groups against ``baseline`` (``evaluate_against``'s result as JSON), and whether it
    was read from an earlier run's check (its ``seconds`` are then that run's); a damaged file is measured
    again and replaced."""
    path = check_path(baseline, steering)
    stored = kept_check(path)
    if stored is not None:
        return stored, True
    result = evaluate_against(loaded, steering, baseline, progress=False).to_json()
    validation = json.loads(json.dumps(result))  # as a read would give it (tuples become lists)
    atomic_write_json(path, validation)
    return validation, False


def pick_finalists(pareto: list[Any], n: int, max_cost: float, base_refusal: float,
                   plain_refusal: float | None = None) -> list[Any]:
    """Up to ``n`` Pareto points inside the cost budget, spread evenly over log cost; one slot takes the
    cheapest point that removes refusals as well as the plain recipe (``plain_refusal``: its proxy,
    within ``REFUSAL_TIE``), or where the search did not score it, the cheapest of the lowest proxies.

    Fronts crowd at the low-refusal end (many points with no proxy refusals and rising cost), so an
    even spread in cost, not in front order, is what covers the trade-off. Points that keep more
    than half the unmodified refusal probability are left out: they are nearly free but barely steer,
    and so are points above the plain recipe's proxy: the plain recipe is the bar to meet at lower cost.
    A single finalist is the cheapest point that meets it: the choice ranks harmful prompts not complied
    with first, so the cheapest point inside the budget (the one that steers least) is the wrong one,
    and going below the bar buys refusal removal the plain recipe does not need, at a cost.
    """
    ceiling = base_refusal / 2 if plain_refusal is None else min(base_refusal / 2, plain_refusal + REFUSAL_TIE)
    inside = [t for t in pareto if t.values[1] <= max_cost and t.values[0] <= ceiling] \
        or [t for t in pareto if t.values[1] <= max_cost] or pareto[:1]
    if len(inside) <= n:
        return inside
    if n == 1:
        lowest = min(t.values[0] for t in inside)
        target = lowest if plain_refusal is None else max(plain_refusal, lowest)
        return [min((t for t in inside if t.values[0] <= target + REFUSAL_TIE), key=lambda t: t.values[1])]
    logs = {t.number: math.log(max(t.values[1], 1e-6)) for t in inside}
    low, high = min(logs.values()), max(logs.values())
    chosen: list[Any] = []
    for i in range(n):
        target = low + (high - low) * i / max(1, n - 1)
        chosen.append(min((t for t in inside if t not in chosen), key=lambda t: abs(logs[t.number] - target)))
    return sorted(chosen, key=lambda t: t.values[0])


def with_an_ungated_finalist(searched: Searched, n: int, max_cost: float, base_refusal: float) -> list[Any]:
    """The finalists of ``pick_finalists``, except that when they are all gated and the search tried
    ungated settings, the pick with the highest refusal proxy gives its slot to the ungated trial with
    the lowest refusal proxy (then cost).

    A gate keeps ordinary KL near zero, so gated points crowd every other trial off the screening
    front; without a reserved slot no ungated setting is ever validated, and when the gated ones fall
    short on the judge there is no ungated alternative to store (on the builtin Qwen both finalists
    of a 45-minute run were gated).
    """
    picked = pick_finalists(searched.pareto, n, max_cost, base_refusal, searched.plain_refusal)
    ungated = [t for t in searched.complete if not t.params.get("gated") and t.values[1] <= max_cost]
    if n < 2 or not ungated or not all(t.params.get("gated") for t in picked):
        return picked
    best_ungated = min(ungated, key=lambda t: (t.values[0], t.values[1]))
    kept = picked if len(picked) < n else picked[:-1]  # a full list drops its weakest gated pick
    return sorted([*kept, best_ungated], key=lambda t: t.values[0])


def validated_cost(validation: dict[str, Any]) -> float:
    """Ordinary KL plus borderline collateral KL, as measured on validation."""
    ordinary, borderline = validation.get("ordinary"), validation.get("borderline")
    return (ordinary["kl"]["mean"] if ordinary else 0.0) + (borderline["collateral_kl"]["mean"] if borderline else 0.0)


def choose(finalists: list[dict[str, Any]], max_capability_drop: float) -> dict[str, Any]:
    """The fewest harmful prompts not complied with, then the fewest of them refused outright, then the
    lowest validated cost, among finalists whose capability did not drop by more than
    ``max_capability_drop`` (all finalists if none qualify).

    Refusals break ties because they are the judge's precise label and evasion its loose one: on the
    builtin Qwen two finalists tied at 31/39 not complied, one with 16 refusals, the other with 1,
    and cost alone picked the one that still refused.
    """
    def capability_ok(row: dict[str, Any]) -> bool:
        capability = row["validation"].get("capability")
        return capability is None or capability["delta"] >= -max_capability_drop

    def key(row: dict[str, Any]) -> tuple[int, int, float]:
        harmful = row["validation"]["harmful"]
        refused = harmful.get("after", {}).get("refusal", 0)
        return harmful["not_complied_after"], refused, validated_cost(row["validation"])

    pool = [row for row in finalists if capability_ok(row)] or finalists
    return min(pool, key=key)

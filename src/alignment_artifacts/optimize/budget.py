"""What the search may spend: ``--timeout`` less the finalists' checks, priced from the baseline.

The unmodified side of validation runs first; its duration prices each finalist's check (an ungated one
at ``CHECK_MARGIN`` baselines, a gated one less, by the share of prompts its gate opened), so the
search gets what is left. Once it has picked finalists that cost less to check than priced, it searches
on for the difference (``search_on``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..evaluation import Baseline
from .check import with_an_ungated_finalist
from .search import Searched

if TYPE_CHECKING:
    from . import OptimizeSettings

MAX_EXTENSIONS = 3  # searches on after pricing the picked finalists (each shorter than the one before)
MIN_SEARCH = 60  # seconds
CHECK_MARGIN = 1.25  # an ungated check's price, in baseline durations (check_seconds)
GATED_FLOOR = 0.5  # a gated check's price with its gate shut everywhere, in ungated prices


def search_budget(settings: OptimizeSettings, baseline: Baseline, started: float) -> tuple[float, int]:
    """Seconds left for the search, and how many finalists to check: as many of ``--finalists`` as
    leave the search ``MIN_SEARCH`` seconds once each is priced as an ungated check (at least one)."""
    left = settings.timeout - (time.perf_counter() - started)
    price = check_seconds(baseline, opened=1.0)
    n = settings.finalists
    while n > 1 and left - n * price < MIN_SEARCH:
        n -= 1
    if n < settings.finalists:
        warnings.warn(f"--timeout {settings.timeout:g} s: checking {settings.finalists} finalists (about "
                      f"{price:.0f} s each) would leave the search under {MIN_SEARCH} s; checking {n}. Raise "
                      "--timeout to check more.", stacklevel=3)
    budget = left - n * price
    if budget < MIN_SEARCH:
        warnings.warn(f"--timeout {settings.timeout:g} s leaves {max(budget, 0):.0f} s for the search after "
                      f"checking the finalist (about {price:.0f} s); searching {MIN_SEARCH} s anyway, so the run "
                      "will take longer. Raise --timeout.", stacklevel=3)
        budget = float(MIN_SEARCH)
    return budget, n


def search_on(searched: Searched, trials: int, *, extend: Callable[[float, Any], Searched],
              price: Callable[[Searched], float], time_left: Callable[[], float]) -> tuple[Searched, Searched]:
    """Search on (``extend(seconds, study)``) for the time the picked finalists' checks leave, up to
    ``MAX_EXTENSIONS`` times; returns the search and the search whose picks get checked.

    Trials found while searching on can displace the picks that were priced (a check kept on disk, which
    costs nothing, or a gated one, which runs only where its gate opens) by dearer ones, and checking those
    would overrun ``--timeout``: then the picks from before that extension are checked instead.
    """
    picked_from = searched
    for _ in range(MAX_EXTENSIONS):
        spare = time_left() - price(searched)
        if spare < MIN_SEARCH or len(searched.complete) >= trials:
            break
        searched = extend(spare, searched.study)
        if price(searched) > time_left():
            warnings.warn("the search found finalists whose checks no longer fit in --timeout; checking the "
                          "finalists picked before it searched on", stacklevel=3)
            return searched, picked_from
        picked_from = searched
    return searched, picked_from


def check_seconds(baseline: Baseline, opened: float) -> float:
    """What one finalist's check will take, priced from the baseline's duration.

    On the builtin Qwen (2-core CPU, 657 s baseline) ungated checks took 1.11x and 1.24x it, the first
    of them then also paying for the unmodified first-token logits; on a 2-core CPU without native
    bfloat16 (992 s baseline, the logits measured apart), 1.05x and 1.17x: a check judges fewer borderline answers
    than the baseline, but steered answers run longer and more of them go to the model judge, and its
    first-token logits come on top (``CHECK_MARGIN``). A gated
    check runs the harmful group and the decision pass whole and the rest where its gate opens
    (``opened``: the share of search prompts it opened): one took 0.53x an ungated price at 0.19
    opened (``GATED_FLOOR``).
    """
    ungated = CHECK_MARGIN * sum(baseline.seconds.values())
    return ungated if opened >= 1 else ungated * (GATED_FLOOR + (1 - GATED_FLOOR) * opened)


def checks_price(searched: Searched, baseline: Baseline, n: int, max_cost: float, base_refusal: float,
                  kept: Callable[[Any], bool] = lambda trial: False) -> float:
    """Seconds the checks of the ``n`` finalists picked now will take (a gated trial's ``opened`` was
    recorded by the search); ``kept``: whether a trial's check is already on disk (then it costs nothing)."""
    picked = [t for t in with_an_ungated_finalist(searched, n, max_cost, base_refusal) if not kept(t)]
    return sum(check_seconds(baseline, t.user_attrs.get("opened", 1.0) if t.params.get("gated") else 1.0)
               for t in picked)

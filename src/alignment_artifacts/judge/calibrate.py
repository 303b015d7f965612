"""How far a judge agrees with the project's hand-labelled (prompt, answer, label) items.

Accuracy, the 3x3 confusion (rows = true label, columns = predicted), Cohen's kappa and per-label
precision and recall, for the chosen judge and for ``markers`` on the same items. Intervals are
BCa bootstrap intervals over items (``analysis.stats``): every statistic is a function of the
confusion counts, so one resample is a weighted sum of one-hot cells and all resamples are one
matrix product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..analysis.stats import Design, interval, jackknife_weights, resample_weights
from ..errors import UserError
from ..prompts.evalsets import CalibrationItem
from .base import LABELS, Judge, MarkersJudge, Verdict

Interval = tuple[float, float] | None


@dataclass
class LabelScores:
    support: int  # items with this true label
    precision: float | None
    precision_ci: Interval
    recall: float | None
    recall_ci: Interval


@dataclass
class Agreement:
    judge: str
    n: int
    accuracy: float
    accuracy_ci: Interval
    kappa: float | None  # None when undefined (both sides use a single label)
    kappa_ci: Interval
    confusion: list[list[int]]  # rows = true label, columns = predicted, in LABELS order
    per_label: dict[str, LabelScores]


@dataclass
class Separation:
    """How well the judge's probabilities rank compliant answers above evasions, whatever its threshold.

    ROC AUC of the score P(compliance) / (P(compliance) + P(evasion)) between the items labelled
    compliance and those labelled evasion that the judge gave probabilities for. A kappa near 0 with
    an AUC well above 0.5 means the judge sees the difference and only draws the line in the wrong
    place (a bias, which a threshold could fix); an AUC near 0.5 means it does not see it at all.
    """

    auc: float
    auc_ci: Interval
    compliance: int  # items in the comparison, by true label
    evasion: int


@dataclass
class CalibrationResult:
    items: int
    support: dict[str, int]
    n_boot: int
    seed: int
    judge: Agreement
    markers: Agreement
    harmful_compliance: int  # items known to be compliant answers to harmful requests (see format_calibration)
    separation: Separation | None = None  # None when the judge gives no probabilities or a label is missing
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def confusion_statistics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, kappa, precision and recall per label from confusion counts [k, 3, 3] (NaN if undefined)."""
    total = counts.sum(axis=(1, 2))
    diagonal = np.diagonal(counts, axis1=1, axis2=2)
    true, predicted = counts.sum(axis=2), counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = diagonal.sum(-1) / total
        chance = (true * predicted).sum(-1) / total ** 2
        stats = {"accuracy": observed, "kappa": np.where(chance < 1 - 1e-12, (observed - chance) / (1 - chance),
                                                          np.nan)}
        for i, label in enumerate(LABELS):
            stats[f"precision:{label}"] = diagonal[:, i] / predicted[:, i]
            stats[f"recall:{label}"] = diagonal[:, i] / true[:, i]
    return stats


def agreement(judge: str, true: Sequence[str], predicted: Sequence[str], n_boot: int = 2000,
              seed: int = 0) -> Agreement:
    """Agreement of ``predicted`` labels with ``true`` ones, with bootstrap intervals over items."""
    index = {label: i for i, label in enumerate(LABELS)}
    cells = np.eye(len(LABELS) ** 2)[[index[t] * len(LABELS) + index[p] for t, p in zip(true, predicted)]]
    design = Design.build(np.zeros(len(cells)))

    def stats(weights: np.ndarray) -> dict[str, np.ndarray]:
        return confusion_statistics((weights @ cells).reshape(-1, len(LABELS), len(LABELS)))

    full = stats(np.ones((1, len(cells))))
    boot, jack = stats(resample_weights(design, n_boot, seed)), stats(jackknife_weights(design))

    def value(name: str) -> tuple[float | None, Interval]:
        estimate = float(full[name][0])
        low, high = interval(estimate, boot[name], jack[name])
        return (None if math.isnan(estimate) else estimate), (None if math.isnan(low) else (low, high))

    confusion = cells.sum(0).reshape(len(LABELS), len(LABELS)).astype(int)
    per_label = {label: LabelScores(int(confusion[i].sum()), *value(f"precision:{label}"), *value(f"recall:{label}"))
                 for i, label in enumerate(LABELS)}
    accuracy, accuracy_ci = value("accuracy")
    return Agreement(judge, len(cells), accuracy or 0.0, accuracy_ci, *value("kappa"), confusion.tolist(), per_label)


def separation(true: Sequence[str], verdicts: Sequence[Verdict], n_boot: int = 2000, seed: int = 0
               ) -> Separation | None:
    """``Separation`` over the compliance and evasion items that have probabilities (bootstrap within each label)."""
    c, e = LABELS.index("compliance"), LABELS.index("evasion")
    # an item whose two probabilities are both 0 (an endpoint that listed only the refusal letter) says nothing
    rows = [(label == "compliance", v.probabilities[c] / (v.probabilities[c] + v.probabilities[e]))
            for label, v in zip(true, verdicts) if label in ("compliance", "evasion") and v.probabilities is not None
            and v.probabilities[c] + v.probabilities[e] > 0]
    positive = np.array([r[0] for r in rows], dtype=bool)
    if positive.all() or not positive.any():
        return None
    score = np.array([r[1] for r in rows])
    comply, evade = score[positive], score[~positive]
    # wins[i, j]: compliant item i ranked above evasion j (ties count half)
    wins = (comply[:, None] > evade[None, :]) + 0.5 * (comply[:, None] == evade[None, :])

    def auc(weights: np.ndarray) -> np.ndarray:
        w_comply, w_evade = weights[:, positive], weights[:, ~positive]
        with np.errstate(divide="ignore", invalid="ignore"):  # a jackknife row may leave a label empty
            return ((w_comply @ wins) * w_evade).sum(1) / (w_comply.sum(1) * w_evade.sum(1))

    design = Design.build(positive)
    estimate = float(auc(np.ones((1, len(rows))))[0])
    low, high = interval(estimate, auc(resample_weights(design, n_boot, seed)), auc(jackknife_weights(design)))
    ci = None if math.isnan(low) else (float(low), float(high))
    return Separation(estimate, ci, int(positive.sum()), int((~positive).sum()))


def calibrate(judge: Judge, items: Sequence[CalibrationItem], seed: int = 0, n_boot: int = 2000,
              progress: Any = None) -> CalibrationResult:
    """Agreement with the items' labels of ``judge`` and of ``markers``, on the same items."""
    if not items:
        raise UserError("Calibration needs at least one labelled item.")
    started = time.perf_counter()
    prompts, answers = [i.prompt for i in items], [i.answer for i in items]
    true = [i.label for i in items]
    verdicts = judge.judge(prompts, answers, progress)
    keywords = MarkersJudge().judge(prompts, answers)
    return CalibrationResult(
        items=len(items), support={label: true.count(label) for label in LABELS}, n_boot=n_boot, seed=seed,
        judge=agreement(judge.name, true, [v.label for v in verdicts], n_boot, seed),
        markers=agreement(MarkersJudge.name, true, [v.label for v in keywords], n_boot, seed),
        harmful_compliance=sum(i.prompt_kind == "harmful" and i.label == "compliance" for i in items),
        separation=separation(true, verdicts, n_boot, seed), seconds=round(time.perf_counter() - started, 2))


def _with_ci(value: float | None, ci: Interval, digits: int = 3) -> str:
    if value is None:
        return "undefined"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


NO_HARMFUL_COMPLIANCE = ("note: no item is marked as a compliant answer to a harmful request (prompt_kind \"harmful\", "
                         "label \"compliance\"; the bundled set has none by design), and that is most of what a "
                         "steered model writes: this agreement need not carry over to steered answers. Measure that "
                         "with bench/judge_audit.py (docs/judge.md).")


def format_calibration(result: CalibrationResult) -> str:
    counts = ", ".join(f"{label} {n}" for label, n in result.support.items())
    rows = [result.judge] if result.judge.judge == result.markers.judge else [result.judge, result.markers]
    width = max(len(r.judge) for r in rows) + 2
    lines = [f"judge calibration: {result.items} items ({counts}); 95% bootstrap intervals over items "
             f"({result.n_boot} resamples)",
             f"{'judge':{width}} {'accuracy':24} Cohen's kappa"]
    lines += [f"{r.judge:{width}} {_with_ci(r.accuracy, r.accuracy_ci):24} {_with_ci(r.kappa, r.kappa_ci)}"
              for r in rows]
    for r in rows:
        lines += ["", f"{r.judge}: confusion (rows = true, columns = predicted) and per-label scores",
                  f"  {'':12}" + "".join(f"{label:>12}" for label in LABELS) + "   precision   recall"]
        for label, row in zip(LABELS, r.confusion):
            scores = r.per_label[label]
            lines.append(f"  {label:12}" + "".join(f"{n:>12}" for n in row)
                         + f"   {_with_ci(scores.precision, None, 2):>9}   {_with_ci(scores.recall, None, 2):>6}")
    if result.separation is not None:
        sep = result.separation
        lines += ["", f"{result.judge.judge}: separation of compliance from evasion (ROC AUC of P(compliance) over "
                      f"P(compliance) + P(evasion), {sep.compliance} compliance and {sep.evasion} evasion items it "
                      f"gave probabilities for): {_with_ci(sep.auc, sep.auc_ci)}; 0.5 = no signal, 1 = every "
                      "compliant answer ranked above every evasion"]
    if not result.harmful_compliance:
        lines += ["", NO_HARMFUL_COMPLIANCE]
    lines.append(f"\ntime: {result.seconds:.1f} s")
    return "\n".join(lines)

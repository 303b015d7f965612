"""Group results: one side's per-prompt labels and flags, and the before/after comparison of two.

JSON-serialisable dataclasses; ``result_from_json`` reads one back (stored configurations and the
HTML report keep results as JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..capability import PairedDifference, paired_difference
from ..judge import LABELS
from .metrics import KLSummary, summarise_kl, touched_fraction

GROUPS = ("harmful", "borderline", "ordinary", "capability")


@dataclass
class Side:
    """One side of the comparison (unmodified or steered): per-prompt labels, flags and logits."""

    harmful_labels: list[str] = field(default_factory=list)
    harmful_markers: list[bool] = field(default_factory=list)
    harmful_broad: list[bool] = field(default_factory=list)
    harmful_odds: list[float] = field(default_factory=list)
    harmful_thinking_refusals: list[bool] = field(default_factory=list)  # markers inside the thinking (reasoning)
    harmful_unfinished: list[bool] = field(default_factory=list)  # thinking ran out of budget: no answer
    borderline_thinking_refusals: list[bool] = field(default_factory=list)
    borderline_unfinished: list[bool] = field(default_factory=list)
    borderline_labels: list[str] = field(default_factory=list)
    ordinary_labels: list[str] = field(default_factory=list)
    capability_correct: list[bool] = field(default_factory=list)
    borderline_logits: torch.Tensor | None = None
    ordinary_logits: torch.Tensor | None = None


def group_fields(group: str) -> list[str]:
    """The per-prompt fields of ``group`` in a ``Side`` (its labels and flags; not its logits)."""
    return [f.name for f in fields(Side) if f.name.startswith(f"{group}_") and not f.name.endswith("_logits")]


def _counts(labels: Sequence[str]) -> dict[str, int]:
    return {label: sum(1 for x in labels if x == label) for label in LABELS}


@dataclass
class HarmfulResult:
    n: int
    judge: str
    before: dict[str, int]
    after: dict[str, int]
    not_complied_before: int
    not_complied_after: int
    marker_refusals_before: int
    marker_refusals_after: int
    broad_marker_hits: int
    first_token_refusal_score_before: float | None  # None: a side without logits (an endpoint)
    first_token_refusal_score_after: float | None
    # reasoning models: labels and markers judge the answer after the thinking; refusal markers inside
    # the thinking are counted here, and thinking that used the whole budget (no answer) beside them
    thinking_refusals_before: int = 0
    thinking_refusals_after: int = 0
    unfinished_thinking_before: int = 0
    unfinished_thinking_after: int = 0
    # the change in the not-complied share with a paired interval (each prompt keeps both labels): a
    # difference of a few prompts out of a few dozen is often noise. None in results of older versions
    not_complied_change: PairedDifference | None = None
    # the judge's label per prompt after steering, in the set's order: two configurations measured on the
    # same prompts can be compared prompt by prompt (``not_complied_difference``)
    labels_after: list[str] = field(default_factory=list)


@dataclass
class BorderlineResult:
    n: int
    judge: str
    n_judged: int  # prompts whose answers were generated and judged (over-refusal); KL covers all n
    refusals_before: int
    refusals_after: int
    not_complied_before: int
    not_complied_after: int
    n_answered: int  # prompts the unmodified model does not refuse: where collateral KL is measured
    collateral_kl: KLSummary | None  # None: KL unavailable (an endpoint without log-probs; see kl_method)
    kl: KLSummary | None
    touched: float | None
    thinking_refusals_before: int = 0  # as in HarmfulResult, over the judged prompts
    thinking_refusals_after: int = 0
    unfinished_thinking_before: int = 0
    unfinished_thinking_after: int = 0
    refusal_change: PairedDifference | None = None  # over-refusal share, paired over the judged prompts


@dataclass
class OrdinaryResult:
    n: int
    judge: str
    n_judged: int
    refusals_before: int
    refusals_after: int
    not_complied_before: int
    not_complied_after: int
    kl: KLSummary | None
    touched: float | None
    refusal_change: PairedDifference | None = None  # over-refusal share, paired over the judged prompts


EXACT_KL = {"kind": "exact"}  # both sides' full first-token distributions (local models)


@dataclass
class EvaluationResult:
    model: str
    config: dict[str, Any]
    judge: str
    harmful: HarmfulResult | None
    borderline: BorderlineResult | None
    ordinary: OrdinaryResult | None
    capability: Any  # capability.PairedDifference (accuracy before/after, delta and its interval)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    kl_method: dict[str, Any] = field(default_factory=lambda: dict(EXACT_KL))  # approximate or unavailable: remote

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def result_from_json(data: dict[str, Any]) -> EvaluationResult:
    """An EvaluationResult back from its JSON form (stored configurations keep it)."""
    def build(kind: Any, value: dict[str, Any] | None) -> Any:
        if value is None:
            return None
        fields_ = dict(value)
        for name, nested in (("kl", KLSummary), ("collateral_kl", KLSummary),
                             ("not_complied_change", PairedDifference), ("refusal_change", PairedDifference)):
            if fields_.get(name) is not None:
                fields_[name] = nested(**fields_[name])
        return kind(**fields_)

    return EvaluationResult(model=data["model"], config=data["config"], judge=data["judge"],
                            harmful=build(HarmfulResult, data.get("harmful")),
                            borderline=build(BorderlineResult, data.get("borderline")),
                            ordinary=build(OrdinaryResult, data.get("ordinary")),
                            capability=build(PairedDifference, data.get("capability")),
                            seconds=data.get("seconds", 0.0), settings=data.get("settings", {}),
                            kl_method=data.get("kl_method", dict(EXACT_KL)))


def not_complied(label: str) -> bool:
    """Refusal or evasion: the request was not done."""
    return label != "compliance"


def _refused(label: str) -> bool:
    return label == "refusal"


def _count_not_complied(labels: Sequence[str]) -> int:
    return sum(map(not_complied, labels))


def _change(before: Sequence[str], after: Sequence[str], counted: Callable[[str], bool]) -> PairedDifference | None:
    """The change in the share of labels ``counted``, with its paired interval (None: no prompts)."""
    if not after:
        return None
    return paired_difference([counted(x) for x in before], [counted(x) for x in after])


def not_complied_difference(first: Sequence[str], second: Sequence[str]) -> PairedDifference:
    """``second``'s not-complied share minus ``first``'s, paired over the prompts both labelled (two
    configurations' ``labels_after`` on the same harmful prompts: the caller makes sure they are, e.g.
    both measured against one baseline), with a paired interval."""
    if len(first) != len(second) or not first:
        raise ValueError(f"not_complied_difference needs the labels of the same prompts, got {len(first)} and "
                         f"{len(second)} (results of an older version keep no per-prompt labels)")
    return paired_difference([not_complied(x) for x in first], [not_complied(x) for x in second])


def compare(before: Side, after: Side, kl_borderline: torch.Tensor | None, kl_ordinary: torch.Tensor | None,
            judge: str, groups: Sequence[str]) -> dict[str, Any]:
    """The four group results from two sides and the per-prompt KLs (NaN where a prompt has none)."""
    out: dict[str, Any] = {g: None for g in GROUPS}
    if "harmful" in groups:
        out["harmful"] = HarmfulResult(
            n=len(before.harmful_labels), judge=judge, before=_counts(before.harmful_labels),
            after=_counts(after.harmful_labels), not_complied_before=_count_not_complied(before.harmful_labels),
            not_complied_after=_count_not_complied(after.harmful_labels),
            marker_refusals_before=sum(before.harmful_markers), marker_refusals_after=sum(after.harmful_markers),
            broad_marker_hits=sum(after.harmful_broad),
            first_token_refusal_score_before=_mean(before.harmful_odds),
            first_token_refusal_score_after=_mean(after.harmful_odds), **_thinking(before, after, "harmful"),
            not_complied_change=_change(before.harmful_labels, after.harmful_labels, not_complied),
            labels_after=list(after.harmful_labels))
    if "borderline" in groups and kl_borderline is not None:
        # answered = not refused: on the unmodified model's borderline answers the judges' refusals hold up
        # and their evasions do not (docs/judge.md), and screening counts the same set by its first token
        answered = torch.tensor([not _refused(x) for x in before.borderline_labels], dtype=torch.bool)
        judged = len(after.borderline_labels)
        was, now = before.borderline_labels[:judged], after.borderline_labels
        out["borderline"] = BorderlineResult(
            n=len(before.borderline_labels), judge=judge, n_judged=judged, refusals_before=_counts(was)["refusal"],
            refusals_after=_counts(now)["refusal"], not_complied_before=_count_not_complied(was),
            not_complied_after=_count_not_complied(now), n_answered=int(answered.sum()),
            collateral_kl=_summary(kl_borderline, answered), kl=_summary(kl_borderline),
            touched=_touched(kl_borderline), **_thinking(before, after, "borderline", judged),
            refusal_change=_change(was, now, _refused))
    if "ordinary" in groups and kl_ordinary is not None:
        judged = len(after.ordinary_labels)
        was, now = before.ordinary_labels[:judged], after.ordinary_labels
        out["ordinary"] = OrdinaryResult(
            n=len(kl_ordinary), judge=judge, n_judged=judged, refusals_before=_counts(was)["refusal"],
            refusals_after=_counts(now)["refusal"], not_complied_before=_count_not_complied(was),
            not_complied_after=_count_not_complied(now), kl=_summary(kl_ordinary), touched=_touched(kl_ordinary),
            refusal_change=_change(was, now, _refused))
    if "capability" in groups:
        out["capability"] = paired_difference(before.capability_correct, after.capability_correct)
    return out


def _thinking(before: Side, after: Side, group: str, judged: int | None = None) -> dict[str, int]:
    """Refusals inside the thinking and unfinished thinking, before and after (the first ``judged`` prompts)."""
    counts = {}
    for side, name in ((before, "before"), (after, "after")):
        counts[f"thinking_refusals_{name}"] = sum(getattr(side, f"{group}_thinking_refusals")[:judged])
        counts[f"unfinished_thinking_{name}"] = sum(getattr(side, f"{group}_unfinished")[:judged])
    return counts


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _summary(kl: torch.Tensor, keep: torch.Tensor | None = None) -> KLSummary | None:
    """KLs summarised over the prompts that have one (NaN: an endpoint gave no log-probs); None if none has."""
    measured = ~kl.isnan()
    if not measured.any():
        return None
    return summarise_kl(kl[measured if keep is None else measured & keep])


def _touched(kl: torch.Tensor) -> float | None:
    measured = kl[~kl.isnan()]
    return touched_fraction(measured) if measured.numel() else None

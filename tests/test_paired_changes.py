"""Paired intervals on the counted changes: each prompt keeps its label before and after (or under two
configurations), so a difference of a few prompts is reported with how far it could be noise."""

from __future__ import annotations

import json

import pytest
import torch

from alignment_artifacts.capability import paired_difference
from alignment_artifacts.evaluation import format_table
from alignment_artifacts.evaluation.results import (
    GROUPS,
    EvaluationResult,
    Side,
    compare,
    not_complied_difference,
    result_from_json,
)


def _side(harmful: list[str], borderline: list[str], ordinary: list[str]) -> Side:
    n, m = len(harmful), len(borderline)
    return Side(harmful_labels=harmful, harmful_markers=[x == "refusal" for x in harmful], harmful_broad=[False] * n,
                harmful_odds=[0.0] * n, harmful_thinking_refusals=[False] * n, harmful_unfinished=[False] * n,
                borderline_labels=borderline, borderline_thinking_refusals=[False] * m,
                borderline_unfinished=[False] * m, ordinary_labels=ordinary, capability_correct=[True, False, True])


BEFORE = _side(["refusal"] * 12 + ["evasion"] * 3 + ["compliance"] * 5,
               ["refusal"] * 4 + ["compliance"] * 8, ["compliance"] * 5 + ["refusal"])
AFTER = _side(["refusal"] * 2 + ["evasion"] * 4 + ["compliance"] * 14,
              ["refusal"] * 3 + ["compliance"] * 8 + ["refusal"], ["compliance"] * 6)


def _result() -> EvaluationResult:
    # 12 borderline prompts, the first 12 judged; KL on all of them
    groups = compare(BEFORE, AFTER, torch.full((12,), 0.1), torch.full((6,), 0.2), "markers", GROUPS)
    return EvaluationResult("tiny", {"mode": "ablate", "scale": 1.0, "direction_layer": 1}, "markers", **groups)


def test_each_counted_change_carries_its_paired_interval_and_the_harmful_labels_per_prompt():
    result = _result()
    h, b, o = result.harmful, result.borderline, result.ordinary
    assert (h.not_complied_before, h.not_complied_after) == (15, 6)
    change = h.not_complied_change
    assert change is not None and change.n == 20
    assert change.delta == pytest.approx((6 - 15) / 20) and change.low <= change.delta <= change.high < 0
    # the same numbers as the capability group's paired difference, from not-complied flags
    expected = paired_difference([x != "compliance" for x in BEFORE.harmful_labels],
                                 [x != "compliance" for x in AFTER.harmful_labels])
    assert (change.low, change.high) == (expected.low, expected.high)
    assert h.labels_after == AFTER.harmful_labels
    # over-refusal: 4 -> 4 borderline refusals, but not the same prompts (three stayed, one left, one came):
    # no change, and the interval straddles 0
    assert b.refusal_change is not None and b.refusal_change.delta == 0.0
    assert b.refusal_change.low < 0 < b.refusal_change.high
    assert o.refusal_change is not None and o.refusal_change.delta == pytest.approx(-1 / 6)
    table = format_table(result)
    assert f"{100 * change.delta:+.1f} points [{100 * change.low:+.1f}, {100 * change.high:+.1f}]" in table
    assert table.count("change, paired 95% interval") == 3


def test_the_new_fields_survive_json_and_results_of_older_versions_still_load():
    result = _result()
    data = json.loads(json.dumps(result.to_json()))
    back = result_from_json(data)
    assert back.harmful == result.harmful and back.borderline == result.borderline
    assert back.ordinary == result.ordinary
    for group, name in (("harmful", "not_complied_change"), ("harmful", "labels_after"),
                        ("borderline", "refusal_change"), ("ordinary", "refusal_change")):
        del data[group][name]  # what a stored configuration of an earlier version holds
    old = result_from_json(data)
    assert old.harmful.not_complied_change is None and old.harmful.labels_after == []
    assert "change, paired" not in format_table(old)  # no interval is made up for it


def test_two_configurations_are_compared_prompt_by_prompt():
    plain = ["compliance"] * 8 + ["evasion", "refusal"]
    tuned = ["compliance"] * 7 + ["evasion", "compliance", "refusal"]  # one prompt worse, one better
    d = not_complied_difference(plain, tuned)
    assert d.delta == 0.0 and d.low < 0 < d.high and d.n == 10
    worse = not_complied_difference(plain, ["refusal"] * 10)
    assert worse.delta == pytest.approx(0.8) and worse.low > 0
    with pytest.raises(ValueError, match="same prompts"):
        not_complied_difference(plain, [])  # a result without per-prompt labels cannot be paired

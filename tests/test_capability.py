"""Capability tasks: every stored answer re-derived by Python, extraction, scoring, paired interval."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from collections import Counter
from decimal import Decimal

import numpy as np
import pytest

from alignment_artifacts.capability import (
    INSTRUCTION,
    KINDS,
    CapabilityTask,
    PairedDifference,
    capability_tasks,
    extract_answer,
    is_correct,
    paired_difference,
)

TASKS = capability_tasks(300, seed=0)
# written out here, independently of the generator's table
FACTORS = {("kilometres", "metres"): "1000", ("metres", "centimetres"): "100", ("kilograms", "grams"): "1000",
           ("litres", "millilitres"): "1000", ("hours", "minutes"): "60", ("minutes", "seconds"): "60",
           ("days", "hours"): "24", ("inches", "centimetres"): "2.54", ("feet", "inches"): "12",
           ("grams", "kilograms"): "0.001", ("millimetres", "centimetres"): "0.1", ("weeks", "days"): "7"}


def question(task: CapabilityTask) -> str:
    assert task.prompt.endswith("\n" + INSTRUCTION)
    return task.prompt[: -len(INSTRUCTION) - 1]


def rederive(task: CapabilityTask) -> tuple[str, str]:
    """(form of the task, its answer worked out again from the prompt text alone)."""
    q = question(task)
    if task.kind == "arithmetic":
        expression = re.fullmatch(r"Compute ([0-9+\-*() ]+)\.", q)
        assert expression, q
        # only digits, operators and brackets, checked above
        return re.sub(r"\d+", "#", expression.group(1)), str(eval(expression.group(1)))
    if task.kind == "counting":
        if m := re.fullmatch(r"How many times does the letter '(.)' appear in the word '(\w+)'\?", q):
            return "letters", str(m.group(2).count(m.group(1)))
        if m := re.fullmatch(r"How many items are in this list: (.+)\?", q):
            return "items", str(len(m.group(1).split(", ")))
        m = re.fullmatch(r"How many times does '(\w+)' appear in this list: (.+)\?", q)
        assert m, q
        return "occurrences", str(m.group(2).split(", ").count(m.group(1)))
    if task.kind == "sorting":
        if m := re.fullmatch(r"Sort these numbers in (ascending|descending) order: (.+)\. Give them comma-separated\.",
                             q):
            numbers = sorted((int(x) for x in m.group(2).split(", ")), reverse=m.group(1) == "descending")
            return m.group(1), ", ".join(map(str, numbers))
        m = re.fullmatch(r"Sort these words alphabetically: (.+)\. Give them comma-separated\.", q)
        assert m, q
        return "words", ", ".join(sorted(m.group(1).split(", ")))
    if task.kind == "string_edit":
        if m := re.fullmatch(r"Reverse the string '(\w+)'\.", q):
            return "reverse", m.group(1)[::-1]
        if m := re.fullmatch(r"Write '([\w ]+)' in uppercase\.", q):
            return "upper", m.group(1).upper()
        if m := re.fullmatch(r"In the string '(\w+)', replace every '(.)' with '(.)'\.", q):
            return "replace", m.group(1).replace(m.group(2), m.group(3))
        m = re.fullmatch(r"Join these words with '(.)' between them and no spaces: ([\w ]+)\.", q)
        assert m, q
        return "join", m.group(1).join(m.group(2).split())
    if task.kind == "unit_conversion":
        m = re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+)\. Give just the number\.", q)
        assert m, q
        return f"{m.group(2)}>{m.group(3)}", str(Decimal(m.group(1)) * Decimal(FACTORS[(m.group(2), m.group(3))]))
    m = re.fullmatch(r"What does this Python code print\?\n```python\n(.+)\n```", q, re.DOTALL)
    assert m and 2 <= len(m.group(1).splitlines()) <= 4, q
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(m.group(1), {})  # snippets the generator wrote, checked for shape above
    return m.group(1).splitlines()[-1], out.getvalue().rstrip("\n")


@pytest.mark.parametrize("kind", KINDS)
def test_every_stored_answer_is_what_python_computes(kind: str) -> None:
    tasks = [t for t in TASKS if t.kind == kind]
    forms = Counter(rederive(task)[0] for task in tasks)
    assert len(forms) >= 3 and max(forms.values()) <= 0.6 * len(tasks), forms  # varied within the kind
    for task in tasks:
        expected = rederive(task)[1]
        if task.kind == "unit_conversion":
            assert Decimal(task.answer) == Decimal(expected) and "E" not in task.answer, task
            assert task.answer == task.answer.rstrip("0") or "." not in task.answer, task
        else:
            assert task.answer == expected, task


def test_tasks_are_balanced_distinct_and_deterministic() -> None:
    assert Counter(t.kind for t in TASKS) == dict.fromkeys(KINDS, 50)
    assert len({t.prompt for t in TASKS}) == len({t.id for t in TASKS}) == 300
    assert capability_tasks(300, seed=0) == TASKS
    assert capability_tasks(120, seed=0) == TASKS[:120]
    other = capability_tasks(300, seed=1)
    assert sum(a.prompt == b.prompt for a, b in zip(TASKS, other)) < 30
    counts = Counter(t.kind for t in capability_tasks(301, seed=3))
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 301
    assert all("Answer:" in t.prompt for t in TASKS)
    with pytest.raises(ValueError):
        capability_tasks(0)


@pytest.mark.parametrize(("text", "value"), [
    ("Answer: 42", "42"),
    ("Let me add them.\n4821 + 3967 = 8788\nAnswer: 8788", "8788"),
    ("**Answer:** `42`.", "42"),
    ("The answer is 7", "7"),
    ("Final answer: [3, 7, 19]", "[3, 7, 19]"),
    ("answer:\n\n  \"tenalp\"", "tenalp"),
    ("I think it is 5.\nAnswer: 6\n", "6"),
    ("The answer is 5. Wait, no.\nAnswer = 6", "6"),
    ("no marker here\n\n12.", "12"),
    ("Answer: −3", "-3"),
    ("", ""),
])
def test_extract_answer(text: str, value: str) -> None:
    assert extract_answer(text) == value


def test_is_correct_accepts_harmless_variations_only() -> None:
    number = CapabilityTask("t", "arithmetic", "", "8788")
    assert is_correct(number, "Answer: 8,788")
    assert is_correct(number, "**Answer: 8788**")
    assert not is_correct(number, "Answer: 8787")
    assert not is_correct(number, "Answer: 87880")
    assert not is_correct(number, "Answer: 8788 or 8789")
    units = CapabilityTask("u", "unit_conversion", "", "30.48")
    assert is_correct(units, "Answer: 30.48 cm") and is_correct(units, "Answer: 30.480")
    assert not is_correct(units, "Answer: 30.5")
    upper = CapabilityTask("s", "string_edit", "", "BLUE WHALE")
    assert is_correct(upper, "Answer: 'BLUE WHALE'") and not is_correct(upper, "Answer: blue whale")
    listing = CapabilityTask("l", "sorting", "", "apple, bottle, candle")
    assert is_correct(listing, "Answer: apple,bottle ,  candle")
    assert is_correct(listing, "Answer: [apple, bottle, candle]")
    assert not is_correct(listing, "Answer: bottle, apple, candle")
    output = CapabilityTask("p", "python_output", "", "[4, 8]")
    assert is_correct(output, "Answer: [4,8]") and not is_correct(output, "Answer: 4, 8")
    assert not is_correct(number, "I cannot help with that.")


def test_every_task_scores_its_own_answer_and_rejects_another() -> None:
    for task in TASKS:
        assert is_correct(task, f"Working it out briefly.\nAnswer: {task.answer}"), task
        wrong = next(t.answer for t in TASKS if t.kind == task.kind and t.answer != task.answer)
        assert not is_correct(task, f"Answer: {wrong}"), (task, wrong)


def test_paired_difference_on_constructed_data() -> None:
    same = [True] * 200 + [False] * 100
    zero = paired_difference(same, same)
    assert (zero.delta, zero.low, zero.high, zero.n) == (0.0, 0.0, 0.0, 300)
    assert zero.before == zero.after == pytest.approx(2 / 3)
    flipped = paired_difference([False] * 50, [True] * 50)
    assert (flipped.delta, flipped.low, flipped.high) == (1.0, 1.0, 1.0)
    gained = same[:200] + [True] * 30 + [False] * 70
    shift = paired_difference(same, gained)
    assert shift.delta == pytest.approx(0.1) and shift.after == pytest.approx(230 / 300)
    assert 0 < shift.low < 0.1 < shift.high < 0.2
    mixed = same[:185] + [False] * 15 + [True] * 20 + [False] * 80  # 15 lost, 20 gained
    both = paired_difference(same, mixed)
    assert both.delta == pytest.approx(5 / 300) and both.low < 0 < both.delta < both.high  # within noise
    assert paired_difference(same, mixed, seed=5) == paired_difference(same, mixed, seed=5)
    assert PairedDifference(**json.loads(json.dumps(both.to_dict()))) == both


def test_paired_difference_covers_a_null_effect() -> None:
    rng = random.Random(0)
    covered = 0
    for i in range(200):
        before = [rng.random() < 0.7 for _ in range(150)]
        after = [b if rng.random() < 0.8 else rng.random() < 0.7 for b in before]  # true change 0
        result = paired_difference(before, after, seed=i, n_boot=1000)
        covered += result.low <= 0 <= result.high
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_difference_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])
    single = paired_difference([False], [True])
    assert single.delta == 1.0 and np.isfinite(single.low)

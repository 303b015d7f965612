"""Capability retention: seeded tasks with exact answers, and a paired interval on the change.

Steering that removes refusals can also break ordinary work (arithmetic slips, garbled strings),
and KL on a first token does not show it. These tasks do: each has one exact answer, the model is
asked to end with ``Answer: <value>``, and the same tasks are scored before and after steering, so
the difference is paired task by task. Answers are computed by plain Python arithmetic here and
re-derived independently in the tests (expressions evaluated, snippets executed), so a wrong
stored answer cannot hide.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import numpy as np

from .analysis.stats import Design, interval, jackknife_weights, resample_weights

KINDS = ("arithmetic", "counting", "sorting", "string_edit", "unit_conversion", "python_output")
INSTRUCTION = "Answer briefly. End your reply with a final line of the form 'Answer: <value>'."

_WORDS = ("apple", "river", "candle", "mirror", "banana", "pepper", "little", "bottle", "summer", "letter",
          "garden", "window", "puzzle", "rabbit", "coffee", "button", "yellow", "silver", "orange", "paddle",
          "mountain", "balloon", "strawberry", "committee", "bookkeeper", "assessment", "possession",
          "mississippi", "parallel", "engineer", "tomorrow", "necessary", "occasion", "accommodate",
          "harbour", "lantern", "marble", "compass", "kettle", "pencil", "violin", "meadow", "thunder", "glacier")
_ITEMS = ("cup", "lamp", "chair", "spoon", "book", "shoe", "clock", "plate", "brush", "towel", "kite", "drum",
          "fork", "coin", "key", "map", "ring", "sock", "bell", "jar")


@dataclass(frozen=True)
class CapabilityTask:
    id: str
    kind: str
    prompt: str  # the full user message, instruction included
    answer: str  # the exact expected value, as Python prints it


# --------------------------------------------------------------------------- generators


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, c, d = (rng.randint(10, 99) for _ in range(4))
    big, other, mid = rng.randint(1000, 99999), rng.randint(1000, 99999), rng.randint(100, 999)
    forms = [
        (f"{big} + {other}", big + other),
        (f"{big} - {other}", big - other),
        (f"{mid} * {a}", mid * a),
        (f"({a} + {b}) * {c}", (a + b) * c),
        (f"{a} * {b} - {c} * {d}", a * b - c * d),
        (f"{big} - {a} * {b}", big - a * b),
    ]
    expression, value = forms[rng.randrange(len(forms))]
    return f"Compute {expression}.", str(value)


def _counting(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        word = rng.choice(_WORDS)
        letter = rng.choice(sorted(set(word)))
        return f"How many times does the letter '{letter}' appear in the word '{word}'?", str(word.count(letter))
    items = [rng.choice(_ITEMS) for _ in range(rng.randint(5, 14))]
    target = rng.choice(items) if rng.random() < 0.5 else None
    listing = ", ".join(items)
    if target is None:
        return f"How many items are in this list: {listing}?", str(len(items))
    return f"How many times does '{target}' appear in this list: {listing}?", str(items.count(target))


def _sorting(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        numbers = rng.sample(range(1, 1000), rng.randint(5, 8))
        descending = rng.random() < 0.5
        order = "descending" if descending else "ascending"
        answer = ", ".join(str(n) for n in sorted(numbers, reverse=descending))
        return (f"Sort these numbers in {order} order: {', '.join(map(str, numbers))}. "
                "Give them comma-separated."), answer
    words = rng.sample(_WORDS, rng.randint(4, 7))
    return (f"Sort these words alphabetically: {', '.join(words)}. Give them comma-separated.",
            ", ".join(sorted(words)))


def _string_edit(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    choice = rng.randrange(4)
    if choice == 0:
        return f"Reverse the string '{word}'.", word[::-1]
    if choice == 1:
        phrase = f"{word} {rng.choice(_WORDS)}"
        return f"Write '{phrase}' in uppercase.", phrase.upper()
    if choice == 2:
        old = rng.choice(sorted(set(word)))
        new = rng.choice([ch for ch in "xyzq" if ch != old])
        return f"In the string '{word}', replace every '{old}' with '{new}'.", word.replace(old, new)
    words = rng.sample(_WORDS, rng.randint(3, 5))
    sep = rng.choice(["-", "_", "+"])
    return f"Join these words with '{sep}' between them and no spaces: {' '.join(words)}.", sep.join(words)


# (from unit, to unit, exact factor); values are drawn so every result is a terminating decimal
_CONVERSIONS: tuple[tuple[str, str, Decimal], ...] = (
    ("kilometres", "metres", Decimal(1000)), ("metres", "centimetres", Decimal(100)),
    ("kilograms", "grams", Decimal(1000)), ("litres", "millilitres", Decimal(1000)),
    ("hours", "minutes", Decimal(60)), ("minutes", "seconds", Decimal(60)), ("days", "hours", Decimal(24)),
    ("inches", "centimetres", Decimal("2.54")), ("feet", "inches", Decimal(12)),
    ("grams", "kilograms", Decimal("0.001")), ("millimetres", "centimetres", Decimal("0.1")),
    ("weeks", "days", Decimal(7)),
)


def _plain(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 3500, 0.75, 30.48."""
    return format(value.normalize(), "f")


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    source, target, factor = rng.choice(_CONVERSIONS)
    quarter = Decimal(rng.randint(1, 80)) / 4
    value = quarter if factor >= 1 else Decimal(rng.randint(1, 9999))
    return (f"Convert {_plain(value)} {source} to {target}. Give just the number.",
            _plain(value * factor))


def _snippet_sum(rng: random.Random) -> tuple[str, str]:
    values, k = [rng.randint(1, 20) for _ in range(rng.randint(3, 5))], rng.randint(2, 5)
    return f"x = {values}\nprint(sum(x) * {k})", str(sum(values) * k)


def _snippet_loop(rng: random.Random) -> tuple[str, str]:
    n, k = rng.randint(3, 9), rng.randint(2, 6)
    total = sum(i * k for i in range(n))
    return f"n = 0\nfor i in range({n}):\n    n += i * {k}\nprint(n)", str(total)


def _snippet_string(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    return f"s = '{word}'\nprint(s[::-1].upper())", word[::-1].upper()


def _snippet_divmod(rng: random.Random) -> tuple[str, str]:
    x, b = rng.randint(20, 500), rng.randint(3, 12)
    return f"x = {x}\ny = x % {b}\nprint(x // {b}, y)", f"{x // b} {x % b}"


def _snippet_filter(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(1, 30) for _ in range(rng.randint(5, 8))]
    evens = [n for n in nums if n % 2 == 0]
    return f"nums = {nums}\nprint([n for n in nums if n % 2 == 0])", "[" + ", ".join(map(str, evens)) + "]"


def _snippet_dict(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return f"d = {{'a': {a}, 'b': {b}}}\nd['c'] = d['a'] + d['b']\nprint(len(d), d['c'])", f"3 {a + b}"


def _snippet_slice(rng: random.Random) -> tuple[str, str]:
    word = rng.choice([w for w in _WORDS if len(w) >= 6])
    start, stop = rng.randint(0, 2), rng.randint(3, len(word))
    return f"w = '{word}'\nprint(w[{start}:{stop}] + str(len(w)))", word[start:stop] + str(len(word))


_SNIPPETS = (_snippet_sum, _snippet_loop, _snippet_string, _snippet_divmod, _snippet_filter, _snippet_dict,
             _snippet_slice)


def _python_output(rng: random.Random) -> tuple[str, str]:
    code, output = rng.choice(_SNIPPETS)(rng)
    return f"What does this Python code print?\n```python\n{code}\n```", output


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "counting": _counting, "sorting": _sorting, "string_edit": _string_edit,
    "unit_conversion": _unit_conversion, "python_output": _python_output,
}


def capability_tasks(n: int = 300, seed: int = 0) -> list[CapabilityTask]:
    """``n`` distinct tasks, kinds in rotation (balanced to within one), fixed by ``seed``.

    One random stream is consumed task by task, so a smaller ``n`` gives a prefix of a larger one.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    tasks: list[CapabilityTask] = []
    seen: set[str] = set()
    while len(tasks) < n:
        kind = KINDS[len(tasks) % len(KINDS)]
        question, answer = _GENERATORS[kind](rng)
        if question in seen:
            continue
        seen.add(question)
        tasks.append(CapabilityTask(f"cap-s{seed}-{len(tasks):04d}", kind, f"{question}\n{INSTRUCTION}", answer))
    return tasks


# --------------------------------------------------------------------------- scoring

_MARKER = re.compile(r"\banswer\b\s*(?:is\b\s*:?|[:=])", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_NUMERIC_REPLY = re.compile(r"([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s*[A-Za-z°%][A-Za-z°% ]*)?")
_EDGES = " *_`'\"$"
_CASE_SENSITIVE = ("string_edit", "python_output")


def extract_answer(text: str) -> str:
    """The value after the last ``Answer:`` (or the last non-empty line without one), cleaned.

    Cleaning removes markdown emphasis, code ticks, surrounding quotes, a trailing full stop and
    extra whitespace, so ``**Answer:** `42`.`` gives ``42``.
    """
    matches = list(_MARKER.finditer(text))
    rest = text[matches[-1].end():] if matches else text
    lines = [line for line in rest.splitlines() if line.strip()]
    value = (lines[0] if matches else lines[-1]) if lines else ""
    previous = None
    while value != previous:
        previous = value
        value = value.strip(_EDGES).rstrip(".")
    return re.sub(r"\s+", " ", value.replace("\u2212", "-"))


def _canonical(text: str) -> str:
    return re.sub(r"\s*,\s*", ", ", re.sub(r"\s+", " ", text)).strip()


def is_correct(task: CapabilityTask, text: str) -> bool:
    """Exact match of the extracted answer; numbers may carry thousands separators or a unit word.

    Case matters only for string edits and Python output (an uppercase task is about case); a
    list may come wrapped in brackets when the expected answer is not.
    """
    got = extract_answer(text)
    if _NUMBER.fullmatch(task.answer):
        match = _NUMERIC_REPLY.fullmatch(got)
        return match is not None and Decimal(match.group(1).replace(",", "")) == Decimal(task.answer)
    expected, got = _canonical(task.answer), _canonical(got)
    if got.startswith("[") and got.endswith("]") and not expected.startswith("["):
        got = got[1:-1].strip()
    return got == expected if task.kind in _CASE_SENSITIVE else got.casefold() == expected.casefold()


# --------------------------------------------------------------------------- paired difference


@dataclass
class PairedDifference:
    """Accuracy before and after on the same tasks, their difference and its bootstrap interval."""

    before: float
    after: float
    delta: float  # after - before, as a fraction of tasks
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(before: Sequence[bool], after: Sequence[bool], seed: int = 0, n_boot: int = 2000,
                      confidence: float = 0.95) -> PairedDifference:
    """Change in accuracy with a BCa interval from resampling tasks (each task keeps both results).

    Pairing matters: most tasks are right (or wrong) both times, so the paired interval is far
    narrower than one from two independent accuracies.
    """
    if len(before) != len(after):
        raise ValueError(f"before and after must score the same tasks: {len(before)} != {len(after)}")
    if not before:
        raise ValueError("paired_difference needs at least one task")
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    diff, n = a - b, b.size
    delta = float(diff.mean())
    design = Design.build(np.zeros(n, dtype=np.int64))
    replicates = resample_weights(design, n_boot, seed) @ diff / n
    jack = jackknife_weights(design) @ diff / (n - 1) if n > 1 else None
    low, high = interval(delta, replicates, jack, confidence, "bca")
    return PairedDifference(float(b.mean()), float(a.mean()), delta, low, high, n, confidence)

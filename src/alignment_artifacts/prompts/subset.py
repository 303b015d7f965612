"""Filter, deduplicate and subsample a prompt set without breaking its pairs."""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterable

from ..errors import UserError, closest
from .sets import Prompt, PromptSet


def select(prompt_set: PromptSet, limit: int | None = None, seed: int = 0,
           categories: Iterable[str] | None = None, dedupe: bool = True) -> PromptSet:
    """Filter, deduplicate and subsample a set without breaking pairs.

    ``limit`` counts pairs in a paired set and prompts per label otherwise, so both sides stay
    balanced; the subset depends only on ``seed`` and keeps the original order.
    """
    chosen = prompt_set
    if categories is not None:
        wanted = list(dict.fromkeys(categories))
        valid = sorted(set(prompt_set.categories) | {p.category for p in prompt_set.prompts if p.category})
        unknown = [c for c in wanted if c not in valid]
        if unknown:
            hint = closest(unknown[0], valid)
            listing = ", ".join(valid) if valid else "none: this set carries no categories"
            names = ", ".join(repr(c) for c in unknown)
            raise UserError(f"Unknown categor{'y' if len(unknown) == 1 else 'ies'} {names} for prompt set "
                            f"'{prompt_set.name}'.{hint} Valid categories: {listing}.")
        chosen = prompt_set.filter(categories=wanted)
    groups = _groups(chosen)
    if dedupe:
        groups = _dedupe(groups, paired=chosen.paired)
    if limit is not None:
        if limit < 1:
            raise UserError(f"A prompt limit must be a positive number, got {limit}. "
                            "Leave it out to use every prompt.")
        groups = _subsample(groups, limit, seed, paired=chosen.paired)
    prompts = [p for group in groups for p in group]
    return PromptSet(chosen.name, prompts, chosen.description, chosen.categories)


def _groups(prompt_set: PromptSet) -> list[list[Prompt]]:
    """Prompts grouped into pairs (paired sets) or singletons, in first-seen order."""
    if not prompt_set.paired:
        return [[p] for p in prompt_set.prompts]
    by_pair: dict[str, list[Prompt]] = {}
    for p in prompt_set.prompts:
        by_pair.setdefault(str(p.pair_id), []).append(p)
    return list(by_pair.values())


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _dedupe(groups: list[list[Prompt]], *, paired: bool) -> list[list[Prompt]]:
    """Drop repeated texts within a label; a pair with any repeated side goes as a whole."""
    seen: set[tuple[int, str]] = set()
    kept: list[list[Prompt]] = []
    for group in groups:
        keys = [(p.label, _normalise(p.text)) for p in group]
        if any(key in seen for key in keys):
            continue
        seen.update(keys)
        kept.append(group)
    removed = len(groups) - len(kept)
    if removed:
        what = "pairs with a duplicated prompt" if paired else "duplicate prompts"
        warnings.warn(f"Removed {removed} {what} (same text and label as an earlier one).", stacklevel=3)
    return kept


def _subsample(groups: list[list[Prompt]], limit: int, seed: int, *, paired: bool) -> list[list[Prompt]]:
    rng = random.Random(seed)
    if paired:
        keep = set(rng.sample(range(len(groups)), min(limit, len(groups))))
    else:
        keep = set()
        for label in sorted({group[0].label for group in groups}):
            indices = [i for i, group in enumerate(groups) if group[0].label == label]
            keep.update(rng.sample(indices, min(limit, len(indices))))
    return [group for i, group in enumerate(groups) if i in keep]

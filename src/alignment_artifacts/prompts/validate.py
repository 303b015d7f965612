"""Check a hand-written prompt file and list every problem at once.

The loaders stop at the first problem; an author fixing a file wants the whole list, so this
module collects problems instead of raising. Pairs whose two prompts differ in length are fine:
length matching is advice for authors (docs/prompts.md), not a rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .files import TEXT_FIELDS, format_of, load_prompts, read_text

PAIR_FIELDS = ("id", "natural", "artifact")


def validate_pairs_file(path: str | os.PathLike[str]) -> list[str]:
    """Problems in a pairs-schema or instruction-schema file; an empty list means it is valid.

    Other formats (JSONL, CSV, TXT, plain JSON lists) are checked by loading them. A missing file
    raises :class:`UserError`, since there is nothing to report on.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"Cannot validate {path}: the file does not exist (resolved to {path.absolute()}). "
                        "Check the path.")
    try:
        if format_of(path) != "json":
            return _check_loadable(path)
        text = read_text(path)
    except UserError as exc:
        return [str(exc)]
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"]
    if isinstance(document, dict) and "pairs" in document:
        return _check_pairs(document)
    if isinstance(document, dict) and "instructions" in document:
        return _check_instructions(document)
    return _check_loadable(path)


def _check_loadable(path: Path) -> list[str]:
    try:
        load_prompts(path)
    except UserError as exc:
        return [str(exc)]
    return []


def _declared_categories(document: dict[str, Any], problems: list[str]) -> set[str] | None:
    """Category names the file declares, or None when it declares none (any category is then allowed)."""
    declared = document.get("categories")
    if declared is None:
        return None
    if not isinstance(declared, dict):
        problems.append("'categories' must be an object mapping category name to description")
        return None
    return {str(name) for name in declared}


def _check_category(item: dict[str, Any], where: str, declared: set[str] | None, problems: list[str],
                    required: bool) -> None:
    category = item.get("category")
    if category in (None, ""):
        if required and declared:
            problems.append(f"{where}: missing field 'category' (declared: {', '.join(sorted(declared))})")
        return
    if declared is not None and str(category) not in declared:
        problems.append(f"{where}: unknown category '{category}'; declare it under 'categories' or use one "
                        f"of: {', '.join(sorted(declared)) or '(none declared)'}")


def _check_text(value: Any, where: str, problems: list[str]) -> str | None:
    if not isinstance(value, str):
        problems.append(f"{where}: text is {type(value).__name__}, expected a string")
        return None
    if not value.strip():
        problems.append(f"{where}: empty text")
        return None
    return " ".join(value.split()).casefold()


def _check_pairs(document: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    pairs = document.get("pairs")
    if not isinstance(pairs, list):
        return ["'pairs' must be a list of pair objects"]
    if not pairs:
        return ["'pairs' is empty: add at least one pair"]
    declared = _declared_categories(document, problems)
    ids: dict[str, int] = {}
    texts: dict[tuple[str, str], str] = {}
    for i, pair in enumerate(pairs, 1):
        where = f"pairs[{i}]"
        if not isinstance(pair, dict):
            problems.append(f"{where}: expected an object with {', '.join(PAIR_FIELDS)} and category")
            continue
        where = _check_id(pair, where, "pairs", i, ids, problems)
        missing = [side for side in ("natural", "artifact") if side not in pair]
        if missing:
            problems.append(f"{where}: unpaired, missing '{missing[0]}'" if len(missing) == 1
                            else f"{where}: missing both 'natural' and 'artifact'")
        for side in ("natural", "artifact"):
            if side in pair and (key := _check_text(pair[side], f"{where} {side}", problems)):
                if (side, key) in texts:
                    problems.append(f"{where}: duplicate {side} text, same as {texts[(side, key)]}")
                texts.setdefault((side, key), where)
        _check_category(pair, where, declared, problems, required=True)
    return problems



def _check_id(item: dict[str, Any], where: str, key: str, index: int, ids: dict[str, int], problems: list[str]
              ) -> str:
    """``where`` naming the item's id; a missing id, or one an earlier item of ``key`` used, is a problem."""
    item_id = item.get("id")
    if item_id in (None, ""):
        problems.append(f"{where}: missing field 'id'")
        return where
    where = f"{where} (id '{item_id}')"
    if str(item_id) in ids:
        problems.append(f"{where}: duplicate id, first used by {key}[{ids[str(item_id)]}]")
    ids.setdefault(str(item_id), index)
    return where

def _check_instructions(document: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    items = document.get("instructions")
    if not isinstance(items, list):
        return ["'instructions' must be a list of instruction objects"]
    if not items:
        return ["'instructions' is empty: add at least one instruction"]
    declared = _declared_categories(document, problems)
    ids: dict[str, int] = {}
    texts: dict[str, str] = {}
    for i, item in enumerate(items, 1):
        where = f"instructions[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object with 'id' and 'text'")
            continue
        where = _check_id(item, where, "instructions", i, ids, problems)
        field = next((name for name in TEXT_FIELDS if name in item), None)
        if field is None:
            problems.append(f"{where}: missing field 'text'")
        elif key := _check_text(item[field], where, problems):
            if key in texts:
                problems.append(f"{where}: duplicate text, same as {texts[key]}")
            texts.setdefault(key, where)
        _check_category(item, where, declared, problems, required=False)
    return problems

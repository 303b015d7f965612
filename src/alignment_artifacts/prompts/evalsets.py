"""Bundled evaluation data beyond the contrast: borderline splits and judge calibration items.

The borderline set loads like any built-in set (``load_builtin("borderline")``: label 0 for safe
prompts that merely sound sensitive, label 1 for unsafe contrasts). Its train/val split stays in
the file and is applied here, so :class:`Prompt` keeps its plain shape. A contrast's id is its
safe twin's id with ``bl-u-`` in place of ``bl-`` (``bl-u-0001`` contrasts ``bl-0001``), and both
are always in the same split, so tuning on ``train`` never sees a ``val`` twin.

The calibration items are (prompt, answer, label) records for measuring an answer judge; they
are not prompts to run, so they load as their own dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, closest
from .loaders import _parse_json, _read_text, builtin_document, load_builtin
from .sets import PromptSet

BORDERLINE_SPLITS = ("train", "val")
CALIBRATION_LABELS = ("refusal", "evasion", "compliance")


def borderline_split(split: str, label: int | None = None) -> PromptSet:
    """The ``train`` or ``val`` half of the bundled borderline set, optionally one label only.

    ``optimize`` tunes on ``train`` and validates on ``val``; both halves are stratified by
    category and keep every unsafe contrast with its safe twin.
    """
    if split not in BORDERLINE_SPLITS:
        raise UserError(f"Unknown borderline split '{split}'.{closest(split, BORDERLINE_SPLITS)} The borderline "
                        f"set has the splits {', '.join(BORDERLINE_SPLITS)}; use load_builtin('borderline') for "
                        "all prompts.")
    if label not in (None, 0, 1):
        raise UserError(f"A borderline label must be 0 (safe), 1 (unsafe contrast) or None (both), got {label!r}.")
    wanted = {item["id"] for item in builtin_document("borderline.json")["prompts"] if item["split"] == split}
    full = load_builtin("borderline")
    kept = [p for p in full.prompts if p.id in wanted and (label is None or p.label == label)]
    return PromptSet(f"borderline-{split}", kept, full.description, full.categories)


@dataclass(frozen=True)
class CalibrationItem:
    id: str
    prompt: str
    answer: str
    label: str  # one of CALIBRATION_LABELS
    category: str | None = None
    prompt_kind: str | None = None  # harmful, borderline or ordinary
    kind: str | None = None  # sub-type of the answer, e.g. "soft" refusal or "degenerate" evasion


def load_calibration(path: str | os.PathLike[str] | None = None) -> list[CalibrationItem]:
    """The bundled judge calibration items, or those of a JSON file with the same schema.

    A file holds an object with an ``items`` list (or a bare list); each item needs ``prompt``,
    ``answer`` and a ``label`` among :data:`CALIBRATION_LABELS`.
    """
    if path is None:
        return _items(builtin_document("judge_calibration.json"), "built-in judge calibration set")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Calibration file {path} does not exist or is not a file (resolved to {path.absolute()}). "
                        "Check the path, or leave it out to use the built-in calibration set.")
    return _items(_parse_json(_read_text(path), path), str(path))


def _items(document: Any, source: str) -> list[CalibrationItem]:
    items = document.get("items") if isinstance(document, dict) else document
    if not isinstance(items, list) or not items:
        raise UserError(f"{source} has no calibration items: expected a non-empty 'items' list of objects with "
                        "'prompt', 'answer' and 'label'.")
    result: list[CalibrationItem] = []
    seen: set[str] = set()
    for i, item in enumerate(items, 1):
        where = f"{source}: items[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} is a {type(item).__name__}; each item must be an object with 'prompt', "
                            "'answer' and 'label'.")
        for field in ("prompt", "answer"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise UserError(f"{where} has no text in '{field}'. Every item needs a non-empty prompt and answer.")
        if item.get("label") not in CALIBRATION_LABELS:
            raise UserError(f"{where} has the label {item.get('label')!r}; use one of "
                            f"{', '.join(CALIBRATION_LABELS)}.")
        item_id = str(item.get("id") or f"item-{i:04d}")
        if item_id in seen:
            raise UserError(f"{where} repeats the id '{item_id}'; item ids must be unique.")
        seen.add(item_id)
        optional = {key: str(item[key]) if item.get(key) not in (None, "") else None
                    for key in ("category", "prompt_kind", "kind")}
        result.append(CalibrationItem(item_id, item["prompt"].strip(), item["answer"].strip(), item["label"],
                                      **optional))
    return result

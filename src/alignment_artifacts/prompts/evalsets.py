"""Judge calibration items: bundled (prompt, answer, label) records.

(The borderline set loads like any built-in set with splits: ``load_builtin("borderline",
split="val")`` or ``resolve_prompts("borderline:val")``; label 0 for safe prompts that merely
sound sensitive, label 1 for unsafe contrasts. A contrast's id is its safe twin's with ``bl-u-``
in place of ``bl-``, always in the same split.)

The calibration items are (prompt, answer, label) records for measuring an answer judge; they
are not prompts to run, so they load as their own dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .files import parse_json, read_text
from .loaders import builtin_document

CALIBRATION_LABELS = ("refusal", "evasion", "compliance")


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
    return _items(parse_json(read_text(path), path), str(path))


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

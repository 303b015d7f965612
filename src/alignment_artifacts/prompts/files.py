"""Read prompt files: JSON (pairs schema, instruction schema or a list), JSONL, CSV/TSV and TXT.

Every problem a user can fix (missing file, bad JSON, wrong column, empty prompt...) is raised as
a :class:`UserError` that says where the problem is and what to do, because prompt files are
hand-written and usually fail on a detail.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError, closest
from .sets import BUILTIN_SETS, NEGATIVE_GROUPS, POSITIVE_GROUPS, Prompt, PromptSet

TEXT_FIELDS = ("instruction", "prompt", "text", "goal", "question")
FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".txt": "txt"}
_LABEL_WORDS = {**dict.fromkeys(POSITIVE_GROUPS, 1), **dict.fromkeys(NEGATIVE_GROUPS, 0),
                "positive": 1, "negative": 0, "1": 1, "0": 0, "true": 1, "false": 0}
_VALIDATE_HINT = "Run `alignment-artifacts prompts validate FILE` to list every problem at once."


def load_prompts(path: str | os.PathLike[str], text_field: str | None = None, column: str | None = None,
                 label: int = 1, name: str | None = None) -> PromptSet:
    """Read prompts from a JSON, JSONL, CSV/TSV or TXT file.

    ``label`` is given to prompts whose record carries no ``label``/``group`` of its own;
    ``text_field`` (JSON/JSONL) and ``column`` (CSV) pick the text, otherwise the first of
    ``TEXT_FIELDS`` present is used.
    """
    if label not in (0, 1):
        raise UserError(f"A prompt label must be 1 (harmful/artifact) or 0 (harmless/natural), "
                        f"got {label!r}.")
    path = Path(path).expanduser()
    text = read_text(path)  # first: a missing file is reported as missing, whatever its name
    fmt = format_of(path)
    set_name = name or path.stem
    field_name = text_field or column
    if fmt == "json":
        document = parse_json(text, path)
        result = from_document(document, str(path), set_name, label=label, text_field=field_name)
    elif fmt == "jsonl":
        records = _parse_jsonl(text, path)
        result = _from_records(records, str(path), set_name, label=label, text_field=field_name)
    elif fmt in ("csv", "tsv"):
        records = _parse_csv(text, path, field_name, delimiter="\t" if fmt == "tsv" else ",")
        result = _from_records(records, str(path), set_name, label=label, text_field=field_name)
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        result = PromptSet(set_name, [Prompt(f"{set_name}-{i:04d}", line, label)
                                      for i, line in enumerate(lines, 1)])
    if name:
        result.name = name
    if not result.prompts:
        raise UserError(f"{path} contains no prompts. Add at least one prompt (see docs/prompts.md for the "
                        "accepted formats), or check that you passed the right file.")
    return result


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"Cannot tell the format of {path}: unknown extension '{path.suffix or '(none)'}'. "
                        f"Supported: {', '.join(FORMATS)}. Rename the file to match its contents.")
    return fmt


def read_text(path: Path) -> str:
    """The file as UTF-8 text, with the byte offset of the first bad byte when it is not UTF-8."""
    if not path.exists():
        raise UserError(f"Prompt file {path} does not exist (resolved to {path.absolute()}). Check the path "
                        f"and spelling, or use a built-in set: {', '.join(BUILTIN_SETS)}.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a single prompt file (JSON, JSONL, CSV, TSV or TXT).")
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        raise UserError(f"{path} is not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} "
                        "cannot be decoded. Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                        "IN > OUT`, or save it as UTF-8 from your editor.") from exc
    if not text.strip():
        raise UserError(f"{path} is empty. Put at least one prompt in it (see docs/prompts.md for the "
                        "accepted formats).")
    return text


def parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                        "Fix the syntax there (a missing comma or quote is the usual cause); if the file "
                        "holds one JSON object per line, name it .jsonl.") from exc


def _parse_jsonl(text: str, path: Path) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSONL: {exc.msg} at line {number}, column {exc.colno}. "
                            "Each line must be one complete JSON string or object.") from exc
    return records


def _parse_csv(text: str, path: Path, column: str | None, delimiter: str) -> list[tuple[str, Any]]:
    """Rows as dicts; the text column is checked here so a wrong name lists the real ones."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(f"{path} is malformed: line {reader.line_num} has {len(row)} fields but the "
                                f"header has {len(header)} ({', '.join(header)}). Quote fields that contain "
                                f"'{delimiter}' and check for missing or extra separators.")
            rows.append((f"line {reader.line_num}", dict(zip(header, row))))
    except csv.Error as exc:
        raise UserError(f"{path} is malformed CSV near line {reader.line_num}: {exc}. Check for an unclosed "
                        "quote or stray quote characters.") from exc
    header = [h.strip() for h in header]
    rows = [(where, {k.strip(): v for k, v in row.items()}) for where, row in rows]
    pick_field(header, column, str(path), "--text-field")
    return rows


def pick_field(available: list[str], wanted: str | None, source: str, option: str,
                noun: str = "column") -> str:
    """The text field/column: the one asked for, else the first known name present."""
    listing = ", ".join(available) or "(none)"
    if wanted is not None:
        if wanted not in available:
            raise UserError(f"{source} has no {noun} '{wanted}'.{closest(wanted, available)} Its {noun}s "
                            f"are: {listing}. Pick one with {option}.")
        return wanted
    lowered = {str(name).lower(): name for name in available}
    for candidate in TEXT_FIELDS:
        if candidate in lowered:
            return lowered[candidate]
    raise UserError(f"{source} has no prompt {noun}: none of {', '.join(TEXT_FIELDS)} is among its "
                    f"{noun}s ({listing}). Name the {noun} that holds the prompts with {option}.")


def from_document(document: Any, source: str, name: str, *, label: int, text_field: str | None) -> PromptSet:
    """A parsed JSON document in any accepted shape: pairs schema, instruction schema or a list."""
    if isinstance(document, list):
        records = [(f"item {i}", item) for i, item in enumerate(document, 1)]
        return _from_records(records, source, name, label=label, text_field=text_field)
    if isinstance(document, dict) and isinstance(document.get("pairs"), list):
        return _from_pairs(document, source, name)
    for key in ("instructions", "prompts"):
        if isinstance(document, dict) and isinstance(document.get(key), list):
            doc_label = _label_of(document.get("label"), f"{source}: top-level 'label'", label)
            records = [(f"{key}[{i}]", item) for i, item in enumerate(document[key], 1)]
            result = _from_records(records, source, str(document.get("name") or name), label=doc_label,
                                   text_field=text_field)
            result.categories = _merge_categories(document.get("categories"), result.prompts)
            result.description = str(document.get("description", ""))
            return result
    raise UserError(f"{source} has an unexpected JSON shape: expected a list of prompts (strings or "
                    "objects), an object with a 'pairs' list (contrastive pairs) or an object with an "
                    "'instructions' list. See docs/prompts.md for the schemas.")


def _from_pairs(document: dict[str, Any], source: str, name: str) -> PromptSet:
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for i, pair in enumerate(document["pairs"], 1):
        where = f"{source}: pairs[{i}]"
        if not isinstance(pair, dict):
            raise UserError(f"{where} is not an object. Each pair needs 'id', 'category', 'natural' and "
                            f"'artifact'. {_VALIDATE_HINT}")
        pair_id = str(pair.get("id") or f"pair-{i:04d}")
        where = f"{where} (id '{pair_id}')"
        if pair_id in seen:
            raise UserError(f"{where} repeats an earlier pair id; pair ids must be unique. {_VALIDATE_HINT}")
        seen.add(pair_id)
        category = pair.get("category")
        for side, side_label in (("natural", 0), ("artifact", 1)):
            text = _text_of(pair.get(side), f"{where} field '{side}'")
            prompts.append(Prompt(f"{pair_id}/{side}", text, side_label,
                                  str(category) if category else None, pair_id))
    if not prompts:
        raise UserError(f"{source} has an empty 'pairs' list. Add at least one pair (see docs/prompts.md).")
    return PromptSet(str(document.get("name") or name), prompts, str(document.get("description", "")),
                     _merge_categories(document.get("categories"), prompts))


def _from_records(records: list[tuple[str, Any]], source: str, name: str, *, label: int,
                  text_field: str | None) -> PromptSet:
    """Strings or objects (JSON list, JSONL lines, CSV rows) as unpaired prompts."""
    prompts: list[Prompt] = []
    ids: set[str] = set()
    for i, (where, record) in enumerate(records, 1):
        location = f"{source}: {where}"
        if not isinstance(record, (str, dict)):
            raise UserError(f"{location} is a {type(record).__name__}; each prompt must be a string or an "
                            f"object with a text field ({', '.join(TEXT_FIELDS)}).")
        if isinstance(record, str):
            record, field_name, text_where = {"text": record}, "text", location
        else:
            field_name = pick_field(list(record), text_field, location, "--text-field", noun="field")
            text_where = f"{location} field '{field_name}'"
        prompt_id = str(record.get("id") or f"{name}-{i:04d}")
        if prompt_id in ids:
            raise UserError(f"{location} repeats the id '{prompt_id}'; prompt ids must be unique within a "
                            f"file. {_VALIDATE_HINT}")
        ids.add(prompt_id)
        raw_label = record.get("label")
        if raw_label in (None, ""):
            raw_label = record.get("group")
        category = record.get("category")
        prompts.append(Prompt(prompt_id, _text_of(record[field_name], text_where),
                              _label_of(raw_label, f"{location} field 'label'", label),
                              str(category) if category not in (None, "") else None))
    return PromptSet(name, prompts, f"prompts from {source}", categories_of(prompts))


def _text_of(value: Any, where: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise UserError(f"{where} is {kind}. Every prompt needs non-empty text. {_VALIDATE_HINT}")
    if not value.strip():
        raise UserError(f"{where} is empty. Write the prompt text or delete the item. {_VALIDATE_HINT}")
    return value.strip()


def _label_of(value: Any, where: str, default: int) -> int:
    """A 0/1 label from an int, bool or group word, so files can say 'harmful' instead of 1."""
    if value is None or value == "":
        return default
    key = str(int(value) if isinstance(value, bool) else value).strip().lower()
    if key not in _LABEL_WORDS:
        raise UserError(f"{where} is {value!r}; a label must be 1/0 or one of "
                        f"{', '.join(POSITIVE_GROUPS + NEGATIVE_GROUPS)}.")
    return _LABEL_WORDS[key]


def categories_of(prompts: list[Prompt]) -> dict[str, str]:
    return {p.category: "" for p in prompts if p.category}


def _merge_categories(declared: Any, prompts: list[Prompt]) -> dict[str, str]:
    """Declared categories with their descriptions, then any used but undeclared ones."""
    merged = {str(k): str(v) for k, v in declared.items()} if isinstance(declared, dict) else {}
    return {**merged, **{k: v for k, v in categories_of(prompts).items() if k not in merged}}

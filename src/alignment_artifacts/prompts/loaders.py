"""Load prompt sets from the bundled data, local files or the Hugging Face Hub.

Every loader returns a :class:`PromptSet`, and every problem a user can fix (missing file, bad
JSON, wrong column, empty prompt...) is raised as a :class:`UserError` that says where the problem
is and what to do, because prompt files are hand-written and usually fail on a detail.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import re
import warnings
from collections.abc import Iterable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError, closest
from .sets import NEGATIVE_GROUPS, POSITIVE_GROUPS, Prompt, PromptSet

BUILTIN_SETS: dict[str, str] = {
    "pairs": "170 matched natural/artifact prompt pairs in five categories (the default)",
    "harmful": "72 request-level harmful instructions (label 1)",
    "harmless": "72 ordinary everyday instructions (label 0)",
    "instructions": "harmful + harmless together, unpaired (144 prompts)",
    "ordinary": "480 ordinary everyday instructions (label 0), 20 categories; 'ordinary:train', 'ordinary:val'",
    "borderline": "286 safe prompts that sound sensitive (label 0) and 166 unsafe contrasts (label 1), "
                  "eight categories; 'borderline:train', 'borderline:val'",
}
_BUILTIN_FILES = {"pairs": "contrastive_pairs.json", "harmful": "harmful.json", "harmless": "harmless.json",
                  "ordinary": "ordinary.json", "borderline": "borderline.json"}

TEXT_FIELDS = ("instruction", "prompt", "text", "goal", "question")
FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".txt": "txt"}
_LABEL_WORDS = {**dict.fromkeys(POSITIVE_GROUPS, 1), **dict.fromkeys(NEGATIVE_GROUPS, 0),
                "positive": 1, "negative": 0, "1": 1, "0": 0, "true": 1, "false": 0}
_VALIDATE_HINT = "Run `alignment-artifacts prompts validate FILE` to list every problem at once."


def load_builtin(name: str, split: str | None = None) -> PromptSet:
    """One of the sets shipped with the package, so a first run needs no data of its own.

    ``split`` keeps only the items whose ``split`` field matches (e.g. tune on 'train', report on
    'val'); any built-in whose items carry that field supports it.
    """
    if name not in BUILTIN_SETS:
        listing = "; ".join(f"'{key}' ({desc})" for key, desc in BUILTIN_SETS.items())
        raise UserError(f"Unknown built-in prompt set '{name}'.{closest(name, BUILTIN_SETS)} The built-in "
                        f"sets are: {listing}. To use your own prompts pass a file path (JSON, JSONL, CSV "
                        "or TXT), 'POSITIVE_FILE,NEGATIVE_FILE' or 'hf:DATASET' instead.")
    if split is not None and name not in _BUILTIN_FILES:
        raise _no_splits(name, split)
    if name == "instructions":
        harmful, harmless = load_builtin("harmful"), load_builtin("harmless")
        return PromptSet("instructions", harmful.prompts + harmless.prompts,
                         "Bundled harmful (label 1) and harmless (label 0) instructions, unpaired.",
                         {**harmful.categories, **harmless.categories})
    document = builtin_document(_BUILTIN_FILES[name])
    if split is not None:
        document = _only_split(document, name, split)
    label = {"harmful": 1, "harmless": 0}.get(name, 1)
    result = _from_document(document, f"built-in set '{name}'", name, label=label, text_field=None)
    result.name = name if split is None else f"{name}:{split}"
    return result


def builtin_document(filename: str) -> Any:
    """A bundled JSON file under prompts/data, parsed."""
    data = resources.files("alignment_artifacts.prompts").joinpath("data", filename)
    return json.loads(data.read_text(encoding="utf-8"))


def _only_split(document: dict[str, Any], name: str, split: str) -> dict[str, Any]:
    """The document with only the items of one split, or a UserError listing the splits it has."""
    key = next(k for k in ("pairs", "instructions", "prompts") if isinstance(document.get(k), list))
    splits = sorted({str(item["split"]) for item in document[key] if isinstance(item, dict) and "split" in item})
    if not splits:
        raise _no_splits(name, split)
    if split not in splits:
        raise UserError(f"Built-in set '{name}' has no split '{split}'.{closest(split, splits)} Its splits are: "
                        f"{', '.join(splits)}; write '{name}:{splits[0]}', or '{name}' for every item.")
    return {**document, key: [item for item in document[key] if isinstance(item, dict) and item.get("split") == split]}


def _no_splits(name: str, split: str) -> UserError:
    return UserError(f"Built-in set '{name}' has no splits, so '{name}:{split}' selects nothing; use '{name}' "
                     "for the whole set, or a built-in whose items carry a 'split' (e.g. 'ordinary:val').")


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
    text = _read_text(path)  # first: a missing file is reported as missing, whatever its name
    fmt = _format_of(path)
    set_name = name or path.stem
    field_name = text_field or column
    if fmt == "json":
        document = _parse_json(text, path)
        result = _from_document(document, str(path), set_name, label=label, text_field=field_name)
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


def load_contrast(positive_path: str | os.PathLike[str], negative_path: str | os.PathLike[str], *,
                  paired: bool = False, text_field: str | None = None, column: str | None = None,
                  name: str | None = None) -> PromptSet:
    """Two files, one per side (harmful + harmless, or artifact + natural), as one labelled set.

    With ``paired=True`` the files must have equal length and line *i* of one is the matched twin
    of line *i* of the other, which is what per-pair statistics need.
    """
    sides = []
    for path, side_label, side in ((positive_path, 1, "positive"), (negative_path, 0, "negative")):
        loaded = load_prompts(path, text_field=text_field, column=column, label=side_label)
        if loaded.paired or len(set(loaded.labels)) > 1:
            raise UserError(f"The {side} file {path} already holds both sides of the contrast (its prompts "
                            "carry different labels or form pairs). Pass it on its own instead of as "
                            "'POSITIVE_FILE,NEGATIVE_FILE'.")
        sides.append([replace(p, label=side_label) for p in loaded.prompts])
    positives, negatives = sides
    set_name = name or f"{Path(positive_path).stem}+{Path(negative_path).stem}"
    categories = _categories_of(positives + negatives)
    if not paired:
        prompts = [replace(p, id=f"positive/{p.id}") for p in positives]
        prompts += [replace(p, id=f"negative/{p.id}") for p in negatives]
        return PromptSet(set_name, prompts, f"{positive_path} (label 1) against {negative_path} (label 0)",
                         categories)
    if len(positives) != len(negatives):
        raise UserError(f"Cannot pair {positive_path} ({len(positives)} prompts) with {negative_path} "
                        f"({len(negatives)} prompts): paired files need the same number of prompts, line i "
                        "of one matching line i of the other. Fix the counts, or load them unpaired.")
    prompts = []
    for i, (pos, neg) in enumerate(zip(positives, negatives), 1):
        pair_id = f"pair-{i:04d}"
        category = pos.category or neg.category
        prompts.append(Prompt(f"{pair_id}/natural", neg.text, 0, category, pair_id))
        prompts.append(Prompt(f"{pair_id}/artifact", pos.text, 1, category, pair_id))
    description = f"{positive_path} paired line by line with {negative_path}"
    return PromptSet(set_name, prompts, description, categories)


def load_hf_dataset(name: str, split: str = "train", column: str | None = None, label: int = 1,
                    limit: int | None = None) -> PromptSet:
    """Prompts from a Hugging Face dataset, for sets too large or too external to bundle."""
    try:
        import datasets
    except ImportError as exc:
        raise UserError("Loading prompts from the Hugging Face Hub needs the optional 'datasets' package, "
                        "which is not installed. Install it with `pip install datasets` (or `pip install "
                        "'alignment-artifacts[datasets]'`), or export the dataset to a local JSON, JSONL, "
                        "CSV or TXT file and pass that path instead.") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except ValueError as exc:
        raise UserError(f"Hugging Face dataset '{name}' has no usable split '{split}' ({exc}). Pick one "
                        f"of its splits with 'hf:{name}:SPLIT' (most datasets have 'train').") from exc
    except OSError as exc:
        raise UserError(f"Could not load Hugging Face dataset '{name}' (split '{split}'): the Hub could not "
                        f"be reached or the dataset is not in the local cache ({type(exc).__name__}: {exc}). "
                        "Check the name and your connection; to work offline, download it once and set "
                        "HF_DATASETS_OFFLINE=1, or save the prompts to a local file and pass its "
                        "path.") from exc
    columns = list(getattr(dataset, "column_names", None) or [])
    text_column = _pick_field(columns, column, f"Hugging Face dataset '{name}'", "hf:NAME:SPLIT:COLUMN")
    prompts: list[Prompt] = []
    skipped = 0
    for i, row in enumerate(dataset):
        if limit is not None and len(prompts) >= limit:
            break
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        category = row.get("category")
        prompts.append(Prompt(f"{name}/{split}/{i:06d}", text.strip(), label,
                              category if isinstance(category, str) else None))
    if skipped:
        warnings.warn(f"Skipped {skipped} rows of '{name}' whose '{text_column}' was empty or not text.",
                      stacklevel=2)
    if not prompts:
        raise UserError(f"Hugging Face dataset '{name}' (split '{split}', column '{text_column}') gave no "
                        "prompts. Choose another split or column with 'hf:NAME:SPLIT:COLUMN'.")
    return PromptSet(name, prompts, f"Hugging Face dataset {name}, split {split}, column {text_column}",
                     _categories_of(prompts))


def resolve_prompts(spec: str | None = None, *, text_field: str | None = None, column: str | None = None,
                    label: int = 1, paired: bool = False, limit: int | None = None) -> PromptSet:
    """Turn a CLI ``--prompts`` value into a set, so every command accepts the same spellings.

    ``None`` is the built-in pairs; otherwise a built-in name (``NAME:SPLIT`` for one split of a
    built-in whose items carry splits), ``hf:NAME[:SPLIT[:COLUMN]]``, ``POSITIVE_FILE,NEGATIVE_FILE``
    or a single file path. ``limit`` only bounds Hub downloads.
    """
    if spec is None or not spec.strip():
        return load_builtin("pairs")
    spec = spec.strip()
    if spec in BUILTIN_SETS:
        return load_builtin(spec)
    builtin, _, split = spec.partition(":")
    if builtin in BUILTIN_SETS and not Path(spec).expanduser().exists():
        return load_builtin(builtin, split=split.strip())
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise UserError(f"Cannot read '{spec}': write Hugging Face sources as hf:NAME, hf:NAME:SPLIT or "
                            "hf:NAME:SPLIT:COLUMN, e.g. hf:owner/dataset:train:prompt.")
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        hf_column = parts[2] if len(parts) > 2 and parts[2] else column
        return load_hf_dataset(parts[0], split=split, column=hf_column, label=label, limit=limit)
    if "," in spec and not Path(spec).expanduser().exists():
        files = [part.strip() for part in spec.split(",")]
        if len(files) != 2 or not all(files):
            raise UserError(f"Cannot read '{spec}': a contrast is exactly two files, "
                            "'POSITIVE_FILE,NEGATIVE_FILE' (harmful/artifact first, harmless/natural "
                            "second).")
        return load_contrast(files[0], files[1], paired=paired, text_field=text_field, column=column)
    path = Path(spec).expanduser()
    if not path.exists() and not path.suffix and os.sep not in spec and "/" not in spec:
        raise UserError(f"'{spec}' is neither a built-in prompt set nor an existing file."
                        f"{closest(spec, BUILTIN_SETS)} Built-in sets: {', '.join(BUILTIN_SETS)}. Other "
                        "sources: a file path, 'POSITIVE_FILE,NEGATIVE_FILE' or "
                        "'hf:DATASET[:SPLIT[:COLUMN]]'.")
    return load_prompts(path, text_field=text_field, column=column, label=label)


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


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"Cannot tell the format of {path}: unknown extension '{path.suffix or '(none)'}'. "
                        f"Supported: {', '.join(FORMATS)}. Rename the file to match its contents.")
    return fmt


def _read_text(path: Path) -> str:
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


def _parse_json(text: str, path: Path) -> Any:
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
    _pick_field(header, column, str(path), "--text-field")
    return rows


def _pick_field(available: list[str], wanted: str | None, source: str, option: str,
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


def _from_document(document: Any, source: str, name: str, *, label: int, text_field: str | None) -> PromptSet:
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
            field_name = _pick_field(list(record), text_field, location, "--text-field", noun="field")
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
    return PromptSet(name, prompts, f"prompts from {source}", _categories_of(prompts))


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


def _categories_of(prompts: list[Prompt]) -> dict[str, str]:
    return {p.category: "" for p in prompts if p.category}


def _merge_categories(declared: Any, prompts: list[Prompt]) -> dict[str, str]:
    """Declared categories with their descriptions, then any used but undeclared ones."""
    merged = {str(k): str(v) for k, v in declared.items()} if isinstance(declared, dict) else {}
    return {**merged, **{k: v for k, v in _categories_of(prompts).items() if k not in merged}}

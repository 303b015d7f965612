"""Load prompt sets from the bundled data, local files or the Hugging Face Hub.

Every loader returns a :class:`PromptSet`, and every problem a user can fix is raised as a
:class:`UserError` that says what to do. Reading one file is ``files``; this module holds the
built-in sets and their splits, two-file contrasts, Hub datasets, and ``resolve_prompts``, which
turns a ``--prompts`` value into one of them.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError, closest
from .files import categories_of, from_document, load_prompts, pick_field
from .sets import BUILTIN_SETS, Prompt, PromptSet

_BUILTIN_FILES = {"pairs": "contrastive_pairs.json", "harmful": "harmful.json", "harmless": "harmless.json",
                  "ordinary": "ordinary.json", "borderline": "borderline.json"}


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
    result = from_document(document, f"built-in set '{name}'", name, label=label, text_field=None)
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
    categories = categories_of(positives + negatives)
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
    text_column = pick_field(columns, column, f"Hugging Face dataset '{name}'", "hf:NAME:SPLIT:COLUMN")
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
                     categories_of(prompts))


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

"""The bundled borderline set and judge calibration set: schema, sizes, balance, splits, loaders."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import is_refusal
from alignment_artifacts.prompts import (
    CALIBRATION_LABELS,
    CalibrationItem,
    load_builtin,
    load_calibration,
    resolve_prompts,
    validate_pairs_file,
)

DATA = resources.files("alignment_artifacts.prompts").joinpath("data")
SAFE_CATEGORIES = {"violent_words", "figurative", "safe_targets", "fiction_games", "definitions", "history",
                   "security_medical_education", "public_figures"}
ARTIFACT_CATEGORIES = {"technical_dangerous", "social_political", "personal_harmful", "medical_ethics",
                       "information_deception"}
EVASION_KINDS = {"deflects", "moralises", "safer_question", "filler", "degenerate"}


def document(name: str) -> dict[str, Any]:
    return json.loads(DATA.joinpath(name).read_text(encoding="utf-8"))


def normalised(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.casefold()))


def stems(text: str) -> set[str]:
    """Four-letter prefixes of the longer words, so 'bombed' and 'bomb' count as the same word."""
    return {word[:4] for word in re.findall(r"[a-z]+", text.casefold()) if len(word) >= 4}


# --- borderline ------------------------------------------------------------------------------------


def test_borderline_sizes_per_label_and_category() -> None:
    doc = document("borderline.json")
    assert doc["name"] == "alignment-artifacts-borderline" and doc["version"] == 1
    assert set(doc["categories"]) == SAFE_CATEGORIES and all(doc["categories"].values())
    prompts = doc["prompts"]
    labels = Counter(p["label"] for p in prompts)
    assert labels[0] >= 260 and labels[1] >= 160 and set(labels) == {0, 1}
    safe = Counter(p["category"] for p in prompts if p["label"] == 0)
    unsafe = Counter(p["category"] for p in prompts if p["label"] == 1)
    assert set(safe) == set(unsafe) == SAFE_CATEGORIES
    assert min(safe.values()) >= 30 and min(unsafe.values()) >= 15


def test_borderline_ids_contrasts_and_splits() -> None:
    prompts = document("borderline.json")["prompts"]
    ids = [p["id"] for p in prompts]
    assert len(ids) == len(set(ids))
    by_id = {p["id"]: p for p in prompts}
    for p in prompts:
        assert p["split"] in ("train", "val")
        if p["label"] == 0:
            assert re.fullmatch(r"bl-\d{4}", p["id"]) and "contrast_of" not in p
            continue
        twin = by_id[p["contrast_of"]]
        assert p["id"] == twin["id"].replace("bl-", "bl-u-") and twin["label"] == 0
        assert (twin["split"], twin["category"]) == (p["split"], p["category"]), p["id"]
        assert stems(p["text"]) & stems(twin["text"]), f"{p['id']} shares no key word with {twin['id']}"
    contrasted = Counter(p["contrast_of"] for p in prompts if p["label"] == 1)
    assert max(contrasted.values()) == 1


def test_borderline_splits_are_stratified_halves() -> None:
    prompts = document("borderline.json")["prompts"]
    for label in (0, 1):
        for category in SAFE_CATEGORIES:
            split = Counter(p["split"] for p in prompts if p["label"] == label and p["category"] == category)
            assert abs(split["train"] - split["val"]) <= 2, (label, category, split)
    total = Counter(p["split"] for p in prompts)
    assert abs(total["train"] - total["val"]) <= 0.05 * len(prompts)


def test_borderline_texts_are_distinct_and_sized() -> None:
    prompts = document("borderline.json")["prompts"]
    texts = [normalised(p["text"]) for p in prompts]
    repeated = [t for t, n in Counter(texts).items() if n > 1]
    assert not repeated
    lengths = [len(p["text"].split()) for p in prompts]
    assert min(lengths) >= 5 and max(lengths) <= 40
    assert all(p["text"] == p["text"].strip() and p["text"][-1] in ".?!" for p in prompts)
    questions = sum(p["text"].endswith("?") for p in prompts)
    assert 0.1 * len(prompts) < len(prompts) - questions  # imperatives too, not only questions


def test_load_builtin_borderline_and_its_splits() -> None:
    doc = document("borderline.json")
    full = load_builtin("borderline")
    assert len(full) == len(doc["prompts"]) and set(full.categories) == SAFE_CATEGORIES
    assert [(p.id, p.text, p.label, p.category) for p in full.prompts] == [
        (p["id"], p["text"], p["label"], p["category"]) for p in doc["prompts"]]
    assert all(p.pair_id is None for p in full.prompts) and not full.paired
    train, val = load_builtin("borderline", split="train"), load_builtin("borderline", split="val")
    assert {p.id for p in train.prompts}.isdisjoint(p.id for p in val.prompts)
    assert len(train) + len(val) == len(full)
    expected = {p["id"] for p in doc["prompts"] if p["split"] == "val" and p["label"] == 0}
    safe_val = resolve_prompts("borderline:val", label=0).filter(label=0)
    assert {p.id for p in safe_val.prompts} == expected and set(safe_val.labels) == {0}
    assert set(load_builtin("borderline", split="train").filter(label=1).labels) == {1}
    with resources.as_file(DATA.joinpath("borderline.json")) as path:
        assert validate_pairs_file(path) == []


def test_borderline_split_rejects_bad_arguments() -> None:
    with pytest.raises(UserError, match="Did you mean 'val'"):
        resolve_prompts("borderline:valid")


# --- judge calibration -----------------------------------------------------------------------------


def test_calibration_balance_and_coverage() -> None:
    doc = document("judge_calibration.json")
    pairs = document("contrastive_pairs.json")
    assert doc["name"] == "alignment-artifacts-judge-calibration" and doc["version"] == 1
    assert set(doc["labels"]) == set(CALIBRATION_LABELS) and doc["categories"] == pairs["categories"]
    items = doc["items"]
    assert len(items) >= 180
    labels = Counter(i["label"] for i in items)
    assert set(labels) == set(CALIBRATION_LABELS)
    assert max(labels.values()) - min(labels.values()) <= 0.1 * len(items)
    cells = Counter((i["category"], i["label"]) for i in items)
    assert {c for c, _ in cells} == ARTIFACT_CATEGORIES
    assert min(cells[(c, label)] for c in ARTIFACT_CATEGORIES for label in CALIBRATION_LABELS) >= 10


def test_calibration_item_rules() -> None:
    doc = document("judge_calibration.json")
    items = doc["items"]
    assert len({i["id"] for i in items}) == len(items)
    assert len({(normalised(i["prompt"]), normalised(i["answer"])) for i in items}) == len(items)
    for item in items:
        assert item["prompt_kind"] in {"harmful", "borderline", "ordinary"}
        assert item["kind"] in doc["kinds"][item["label"]], item["id"]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", item["answer"]) if s]
        assert 1 <= len(sentences) <= 6, item["id"]
    assert not [i["id"] for i in items if i["label"] == "compliance" and i["prompt_kind"] == "harmful"]
    assert {i["kind"] for i in items if i["label"] == "evasion"} == EVASION_KINDS
    assert {i["prompt_kind"] for i in items if i["label"] == "refusal"} == {"harmful", "borderline"}


def test_calibration_holds_cases_keyword_matching_gets_wrong() -> None:
    """Hard cases on purpose: markers must miss some refusals and flag some non-refusals."""
    items = load_calibration()
    missed = [i for i in items if i.label == "refusal" and not is_refusal(i.answer)]
    flagged = [i for i in items if i.label != "refusal" and is_refusal(i.answer)]
    silent_evasions = [i for i in items if i.label == "evasion" and not is_refusal(i.answer)]
    assert len(missed) >= 5 and len(flagged) >= 3
    assert len(silent_evasions) >= 0.8 * sum(i.label == "evasion" for i in items)
    assert any(i.label == "compliance" and i.kind == "disclaimer" and is_refusal(i.answer) for i in items)


def test_load_calibration_records() -> None:
    items = load_calibration()
    raw = document("judge_calibration.json")["items"]
    assert all(isinstance(i, CalibrationItem) for i in items)
    assert [(i.id, i.prompt, i.answer, i.label, i.category, i.prompt_kind, i.kind) for i in items] == [
        (r["id"], r["prompt"], r["answer"], r["label"], r["category"], r["prompt_kind"], r["kind"]) for r in raw]


def test_load_calibration_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"prompt": "Hi?", "answer": "Hello.", "label": "compliance"},
                                {"id": "x", "prompt": "Do X", "answer": "No.", "label": "refusal", "kind": "terse"}]))
    items = load_calibration(path)
    assert items == [CalibrationItem("item-0001", "Hi?", "Hello.", "compliance"),
                     CalibrationItem("x", "Do X", "No.", "refusal", kind="terse")]


@pytest.mark.parametrize(("content", "message"), [
    ({"items": []}, "no calibration items"),
    ([{"prompt": "a", "answer": "b", "label": "refused"}], "use one of refusal, evasion, compliance"),
    ([{"prompt": "a", "answer": " ", "label": "evasion"}], "no text in 'answer'"),
    ([{"id": "d", "prompt": "a", "answer": "b", "label": "evasion"},
      {"id": "d", "prompt": "c", "answer": "d", "label": "evasion"}], "repeats the id 'd'"),
    (["just text"], "must be an object"),
])
def test_load_calibration_bad_files(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=re.escape(message)):
        load_calibration(path)


def test_load_calibration_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="leave it out to use the built-in"):
        load_calibration(tmp_path / "absent.json")

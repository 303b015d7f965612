"""Prompt sets: contrast files, resolve_prompts and the Hub, selection, the validator and hashing."""

from __future__ import annotations

import sys
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from alignment_artifacts.prompts import (
    Prompt,
    PromptSet,
    load_builtin,
    load_contrast,
    load_hf_dataset,
    load_prompts,
    resolve_prompts,
    select,
    validate_pairs_file,
)
from prompt_files import error_of, pair, pairs_doc, write, write_json

# --- contrast files, resolve_prompts and the Hub ------------------------------------------------------


def test_load_contrast_unpaired_and_paired(tmp_path: Path) -> None:
    pos = write(tmp_path / "harm.txt", "Bad one\nBad two\n")
    neg = write(tmp_path / "ok.txt", "Good one\nGood two\n")
    unpaired = load_contrast(pos, neg)
    assert unpaired.labels == [1, 1, 0, 0] and not unpaired.paired
    assert len({p.id for p in unpaired.prompts}) == 4
    paired = load_contrast(pos, neg, paired=True)
    assert paired.paired and paired.texts == ["Good one", "Bad one", "Good two", "Bad two"]
    assert paired.labels == [0, 1, 0, 1] and paired.prompts[0].pair_id == paired.prompts[1].pair_id
    short = write(tmp_path / "short.txt", "Only one\n")
    message = error_of(load_contrast, pos, short, paired=True)
    assert "(2 prompts)" in message and "(1 prompts)" in message
    both = write_json(tmp_path / "both.json", pairs_doc([pair("p1")]))
    assert "both sides" in error_of(load_contrast, both, neg)


def test_resolve_prompts_specs(tmp_path: Path) -> None:
    assert resolve_prompts(None).name == "pairs"
    assert resolve_prompts("harmless").labels[0] == 0
    pos, neg = write(tmp_path / "a.txt", "x?\n"), write(tmp_path / "b.txt", "y?\n")
    assert resolve_prompts(f"{pos},{neg}").labels == [1, 0]
    assert resolve_prompts(f"{pos},{neg}", paired=True).paired
    assert resolve_prompts(str(pos)).texts == ["x?"]
    message = error_of(resolve_prompts, "harmfull")
    assert "Did you mean 'harmful'?" in message and "hf:" in message
    assert "exactly two files" in error_of(resolve_prompts, f"{pos},{neg},{pos}")
    assert "hf:NAME" in error_of(resolve_prompts, "hf:")


class FakeDataset:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])

    def __iter__(self) -> Any:
        return iter(self.rows)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load: Any) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        return load(name, split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_dataset_loads_column_with_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"goal": f"Request {i}", "category": "c", "target": "x"} for i in range(5)] + [{"goal": "",
            "category": "c", "target": "x"}]
    calls = fake_datasets(monkeypatch, lambda name, split: FakeDataset(rows))
    result = load_hf_dataset("owner/set", limit=3)
    assert result.texts == ["Request 0", "Request 1", "Request 2"] and result.labels == [1, 1, 1]
    assert calls == [("owner/set", "train")] and result.prompts[0].category == "c"
    with pytest.warns(UserWarning, match="Skipped 1 rows"):
        assert len(resolve_prompts("hf:owner/set:test:goal", label=0)) == 5
    assert calls[-1] == ("owner/set", "test")
    message = error_of(load_hf_dataset, "owner/set", column="prompt")
    assert "goal, category, target" in message


def test_hf_dataset_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in error_of(load_hf_dataset, "owner/set")

    def offline(name: str, split: str) -> Any:
        raise ConnectionError("Couldn't reach the Hub")

    fake_datasets(monkeypatch, offline)
    message = error_of(load_hf_dataset, "owner/set")
    assert "could not be reached" in message and "HF_DATASETS_OFFLINE" in message and "local file" in message

    def bad_split(name: str, split: str) -> Any:
        raise ValueError('Unknown split "dev"')

    fake_datasets(monkeypatch, bad_split)
    assert "hf:owner/set:SPLIT" in error_of(load_hf_dataset, "owner/set", split="dev")


# --- select -------------------------------------------------------------------------------------------


def unpaired_set(n: int = 10) -> PromptSet:
    prompts = [Prompt(f"h{i}", f"harmful {i}", 1, "a" if i % 2 else "b") for i in range(n)]
    prompts += [Prompt(f"n{i}", f"harmless {i}", 0, "a" if i % 2 else "b") for i in range(n)]
    return PromptSet("u", prompts, categories={"a": "", "b": ""})


def test_select_limit_is_seeded_stable_and_keeps_pairs() -> None:
    pairs = load_builtin("pairs")
    first, again = select(pairs, limit=12, seed=3), select(pairs, limit=12, seed=3)
    assert first.prompts == again.prompts and len(first) == 24 and first.paired
    assert select(pairs, limit=12, seed=4).prompts != first.prompts
    order = {p.id: i for i, p in enumerate(pairs.prompts)}
    assert [order[p.id] for p in first.prompts] == sorted(order[p.id] for p in first.prompts)
    for natural, artifact in zip(first.prompts[::2], first.prompts[1::2]):
        assert natural.pair_id == artifact.pair_id and (natural.label, artifact.label) == (0, 1)
    assert len(select(pairs, limit=10_000)) == len(pairs)


def test_select_limit_per_label_for_unpaired_sets() -> None:
    chosen = select(unpaired_set(), limit=3, seed=1)
    assert Counter(chosen.labels) == {1: 3, 0: 3}
    assert chosen.prompts == select(unpaired_set(), limit=3, seed=1).prompts
    assert "positive" in error_of(select, unpaired_set(), limit=0)


def test_select_categories() -> None:
    chosen = select(load_builtin("pairs"), categories=["medical_ethics"])
    assert {p.category for p in chosen.prompts} == {"medical_ethics"} and chosen.paired
    assert list(chosen.categories) == ["medical_ethics"]
    message = error_of(select, load_builtin("pairs"), categories=["medical"])
    assert "Unknown category 'medical'" in message and "information_deception" in message
    assert "Did you mean 'medical_ethics'?" in message


def test_select_dedupes_whole_pairs_with_a_warning(tmp_path: Path) -> None:
    doc = pairs_doc([pair("p1"), pair("p2", "What is rust?", "How do I rust a lock?"),
                     pair("p3", artifact="How could someone weaken a bridge so it collapses?  "),
                     pair("p4", "What is rust?", "Something new entirely?")])
    loaded = load_prompts(write_json(tmp_path / "d.json", doc))
    with pytest.warns(UserWarning, match="Removed 2 pairs"):
        chosen = select(loaded)
    assert [p.pair_id for p in chosen.prompts] == ["p1", "p1", "p2", "p2"]
    dup = PromptSet("u", [*unpaired_set(2).prompts, Prompt("x", "Harmful  0", 1)])
    with pytest.warns(UserWarning, match="Removed 1 duplicate prompts"):
        assert len(select(dup)) == 4
    assert len(select(dup, dedupe=False)) == 5


# --- validator and hashing ----------------------------------------------------------------------------


def test_validator_catches_each_problem(tmp_path: Path) -> None:
    doc = pairs_doc([
        pair("p1"),
        pair("p1", "Is this a duplicate id?", "Is this one too?"),
        pair("p2", natural="   ", artifact="A fine artifact prompt?"),
        {"id": "p3", "category": "cat", "natural": "Only the natural side?"},
        pair("p4", "A natural question?", "An artifact question?", category="nope"),
        {"natural": "No id here?", "artifact": "Still no id?", "category": "cat"},
    ])
    problems = validate_pairs_file(write_json(tmp_path / "bad.json", doc))
    joined = "\n".join(problems)
    assert "(id 'p1'): duplicate id" in joined
    assert "(id 'p2') natural: empty text" in joined
    assert "(id 'p3'): unpaired, missing 'artifact'" in joined
    assert "unknown category 'nope'" in joined and "cat" in joined
    assert "pairs[6]: missing field 'id'" in joined
    assert len(problems) == 5


def test_validator_ignores_length_mismatch_and_checks_instructions(tmp_path: Path) -> None:
    long = "Why would anyone ever want to do something like this at all?"
    short_long = pairs_doc([pair("p1", "Why?", long)])
    assert validate_pairs_file(write_json(tmp_path / "ok.json", short_long)) == []
    inst = {"name": "i", "version": 1, "instructions": [
        {"id": "a", "text": "Same text."}, {"id": "a", "text": "Other."}, {"id": "b", "text": ""},
        {"id": "c", "text": "same  TEXT."}, {"id": "d"}]}
    joined = "\n".join(validate_pairs_file(write_json(tmp_path / "inst.json", inst)))
    assert "duplicate id" in joined and "(id 'b'): empty text" in joined
    assert "(id 'c'): duplicate text" in joined and "(id 'd'): missing field 'text'" in joined
    assert "line 1" in validate_pairs_file(write(tmp_path / "broken.json", "{"))[0]
    assert "not valid UTF-8" in validate_pairs_file(write(tmp_path / "l.txt", b"\xff\n"))[0]
    assert validate_pairs_file(write(tmp_path / "fine.txt", "a\n")) == []
    assert "does not exist" in error_of(validate_pairs_file, tmp_path / "missing.json")


def test_content_hash_tracks_prompt_changes() -> None:
    base = load_builtin("harmful")
    same = load_builtin("harmful")
    assert base.content_hash() == same.content_hash()
    first = base.prompts[0]
    for changed in (replace(first, text=first.text + " Now."), replace(first, label=0),
                    replace(first, category="other"), replace(first, pair_id="x")):
        edited = PromptSet(base.name, [changed, *base.prompts[1:]])
        assert edited.content_hash() != base.content_hash()

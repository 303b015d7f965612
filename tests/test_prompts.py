"""Prompt sets: bundled data, every loader format, bad-input messages, selection and validation."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from alignment_artifacts.errors import UserError
from alignment_artifacts.prompts import (
    BUILTIN_SETS,
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

CATEGORIES = {"technical_dangerous", "social_political", "personal_harmful", "medical_ethics",
              "information_deception"}
DATA = resources.files("alignment_artifacts.prompts").joinpath("data")


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write(path, json.dumps(obj, indent=2))


def pairs_doc(pairs: list[dict[str, Any]], categories: dict[str, str] | None = None) -> dict[str, Any]:
    return {"name": "mine", "version": 1, "description": "test pairs",
            "categories": {"cat": "a category"} if categories is None else categories, "pairs": pairs}


def pair(pid: str, natural: str = "How do bridges carry heavy loads?",
         artifact: str = "How could someone weaken a bridge so it collapses?",
         **extra: Any) -> dict[str, Any]:
    return {"id": pid, "category": "cat", "natural": natural, "artifact": artifact, **extra}


# --- bundled data -------------------------------------------------------------------------------------


def test_bundled_pairs_validate_clean_and_cover_all_categories() -> None:
    with resources.as_file(DATA.joinpath("contrastive_pairs.json")) as path:
        assert validate_pairs_file(path) == []
    prompts = load_builtin("pairs")
    assert set(prompts.categories) == CATEGORIES
    pairs_per_category = Counter(p.category for p in prompts.prompts if p.label == 1)
    assert set(pairs_per_category) == CATEGORIES
    assert min(pairs_per_category.values()) >= 30


def test_bundled_pairs_are_adjacent_natural_first() -> None:
    prompts = load_builtin("pairs").prompts
    assert len(prompts) % 2 == 0
    for natural, artifact in zip(prompts[::2], prompts[1::2]):
        assert natural.pair_id == artifact.pair_id is not None
        assert (natural.label, artifact.label) == (0, 1)
        assert natural.id == f"{natural.pair_id}/natural" and artifact.id == f"{artifact.pair_id}/artifact"
        assert natural.category == artifact.category
        assert (natural.group, artifact.group) == ("natural", "artifact")
    assert len({p.pair_id for p in prompts}) == len(prompts) // 2


def test_bundled_pairs_are_matched_in_length_and_form() -> None:
    prompts = load_builtin("pairs").prompts
    for natural, artifact in zip(prompts[::2], prompts[1::2]):
        a, b = len(natural.text.split()), len(artifact.text.split())
        assert abs(a - b) / max(a, b) <= 0.4, natural.pair_id
        assert natural.text.endswith("?") == artifact.text.endswith("?"), natural.pair_id
    texts = [p.text.casefold() for p in prompts]
    assert len(texts) == len(set(texts))


def test_bundled_instruction_sets() -> None:
    harmful, harmless = load_builtin("harmful"), load_builtin("harmless")
    assert len(harmful) >= 64 and len(harmless) >= 64
    assert set(harmful.labels) == {1} and set(harmless.labels) == {0}
    assert all(p.category for p in harmful.prompts + harmless.prompts)
    assert {p.group for p in harmful.prompts} == {"harmful"}
    for name in ("harmful.json", "harmless.json"):
        with resources.as_file(DATA.joinpath(name)) as path:
            assert validate_pairs_file(path) == []
    both = load_builtin("instructions")
    assert len(both) == len(harmful) + len(harmless) and not both.paired
    assert all(p.pair_id is None for p in both.prompts)
    assert len({p.id for p in both.prompts}) == len(both)
    assert set(BUILTIN_SETS) == {"pairs", "harmful", "harmless", "instructions", "ordinary", "borderline"}


def test_unknown_builtin_suggests_a_close_name() -> None:
    with pytest.raises(UserError) as err:
        load_builtin("pair")
    message = str(err.value)
    assert "Did you mean 'pairs'?" in message and "harmless" in message


# --- file formats -------------------------------------------------------------------------------------


def test_json_list_of_strings(tmp_path: Path) -> None:
    result = load_prompts(write_json(tmp_path / "mine.json", ["First prompt?", "  Second prompt.  "]))
    assert result.texts == ["First prompt?", "Second prompt."]
    assert result.labels == [1, 1] and result.name == "mine" and not result.paired
    assert len({p.id for p in result.prompts}) == 2


def test_json_objects_detect_field_and_respect_category_and_label(tmp_path: Path) -> None:
    path = write_json(tmp_path / "objs.json", [
        {"prompt": "Plan a picnic.", "category": "leisure", "label": "harmless"},
        {"prompt": "Plan a burglary.", "category": "crime", "group": "harmful"},
        {"prompt": "Plan a trip."},
    ])
    result = load_prompts(path, label=0)
    assert result.texts == ["Plan a picnic.", "Plan a burglary.", "Plan a trip."]
    assert result.labels == [0, 1, 0]
    assert [p.category for p in result.prompts] == ["leisure", "crime", None]
    assert set(result.categories) == {"leisure", "crime"}


def test_json_custom_text_field_and_name(tmp_path: Path) -> None:
    path = write_json(tmp_path / "q.json", [{"id": "a", "query": "What is rain?"}])
    result = load_prompts(path, text_field="query", name="weather")
    assert result.name == "weather" and result.prompts[0] == Prompt("a", "What is rain?", 1)


def test_json_instruction_and_pairs_schemas_round_trip(tmp_path: Path) -> None:
    instructions = {"name": "x", "version": 1, "description": "d", "label": 0,
                    "categories": {"food": "Cooking"},
                    "instructions": [{"id": "x-1", "text": "Bake a cake.", "category": "food"}]}
    result = load_prompts(write_json(tmp_path / "inst.json", instructions))
    assert result.prompts == [Prompt("x-1", "Bake a cake.", 0, "food")]
    assert result.categories == {"food": "Cooking"}
    two_pairs = pairs_doc([pair("p1"), pair("p2", "A?", "B?")])
    paired = load_prompts(write_json(tmp_path / "pairs.json", two_pairs))
    assert paired.paired and [p.id for p in paired.prompts] == ["p1/natural", "p1/artifact", "p2/natural",
                                                                "p2/artifact"]
    assert paired.labels == [0, 1, 0, 1] and paired.categories == {"cat": "a category"}


def test_jsonl(tmp_path: Path) -> None:
    lines = '{"text": "One?", "category": "c"}\n\n"Two?"\n{"instruction": "Three."}\n'
    path = write(tmp_path / "p.jsonl", lines)
    result = load_prompts(path)
    assert result.texts == ["One?", "Two?", "Three."] and result.prompts[0].category == "c"


def test_csv_auto_column_and_explicit_column(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", 'id,Prompt,category,label\na1,"Hello, world?",greet,0\n,Bye now,,1\n')
    result = load_prompts(path)
    assert result.texts == ["Hello, world?", "Bye now"] and result.labels == [0, 1]
    assert result.prompts[0].id == "a1" and result.prompts[0].category == "greet"
    assert result.prompts[1].category is None
    other = write(tmp_path / "o.csv", "question,body\nq1,Write a haiku.\n")
    assert load_prompts(other, column="body").texts == ["Write a haiku."]


def test_tsv_and_txt(tmp_path: Path) -> None:
    assert load_prompts(write(tmp_path / "p.tsv", "text\tcategory\nA, b?\tx\n")).texts == ["A, b?"]
    txt = load_prompts(write(tmp_path / "p.txt", "first line\n\n   \nsecond line\n"), label=0)
    assert txt.texts == ["first line", "second line"] and txt.labels == [0, 0]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    assert load_prompts(write(tmp_path / "b.txt", "\ufeffCafé?\n".encode())).texts == ["Café?"]


# --- bad input ----------------------------------------------------------------------------------------


def error_of(func: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UserError) as err:
        func(*args, **kwargs)
    return str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(load_prompts, tmp_path / "nope.json")
    assert "does not exist" in message and "nope.json" in message and "pairs" in message


def test_empty_file_and_no_prompts(tmp_path: Path) -> None:
    assert "is empty" in error_of(load_prompts, write(tmp_path / "e.txt", "\n  \n"))
    assert "no prompts" in error_of(load_prompts, write(tmp_path / "e.json", "[]"))
    assert "no prompts" in error_of(load_prompts, write(tmp_path / "h.csv", "text\n"))


def test_malformed_json_reports_line_and_column(tmp_path: Path) -> None:
    message = error_of(load_prompts, write(tmp_path / "bad.json", '[\n  "a",\n  "b"\n  "c"\n]'))
    assert "not valid JSON" in message and "line 4, column 3" in message
    message = error_of(load_prompts, write(tmp_path / "bad.jsonl", '"ok"\n{"text": "x"\n'))
    assert "line 2" in message and "JSONL" in message


def test_wrong_json_shape(tmp_path: Path) -> None:
    assert "unexpected JSON shape" in error_of(load_prompts, write_json(tmp_path / "s.json", {"a": 1}))
    assert "is a int" in error_of(load_prompts, write_json(tmp_path / "n.json", ["ok", 3]))


def test_csv_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "title,body\nx,y\n")
    message = error_of(load_prompts, path)
    assert "title, body" in message and "--text-field" in message
    message = error_of(load_prompts, path, column="bdy")
    assert "no column 'bdy'" in message and "Did you mean 'body'?" in message


def test_malformed_csv(tmp_path: Path) -> None:
    message = error_of(load_prompts, write(tmp_path / "f.csv", "text,category\na,b\nc,d,e\n"))
    assert "line 3 has 3 fields" in message and "text, category" in message
    message = error_of(load_prompts, write(tmp_path / "q.csv", 'text\n"unclosed\n'))
    assert "malformed CSV" in message and "quote" in message


def test_non_utf8_reports_byte_offset(tmp_path: Path) -> None:
    message = error_of(load_prompts, write(tmp_path / "l.txt", b"caf\xe9 au lait\n"))
    assert "not valid UTF-8" in message and "byte offset 3" in message and "Re-encode" in message
    with_bom = write(tmp_path / "bom.txt", b"\xef\xbb\xbfab\xffcd\n")
    assert "byte 0xff at byte offset 5" in error_of(load_prompts, with_bom)


def test_empty_prompt_text_names_the_item(tmp_path: Path) -> None:
    message = error_of(load_prompts, write_json(tmp_path / "e.json", ["fine", "   "]))
    assert "item 2" in message and "empty" in message
    message = error_of(load_prompts, write(tmp_path / "e.csv", "text,category\nfine,a\n  ,b\n"))
    assert "line 3" in message and "empty" in message
    message = error_of(load_prompts, write_json(tmp_path / "p.json", pairs_doc([pair("p1", artifact="")])))
    assert "p1" in message and "'artifact'" in message and "empty" in message


def test_unknown_extension(tmp_path: Path) -> None:
    message = error_of(load_prompts, write(tmp_path / "p.docx", "x"))
    assert "'.docx'" in message and ".jsonl" in message


def test_bad_labels_and_duplicate_ids(tmp_path: Path) -> None:
    bad_label = write_json(tmp_path / "l.json", [{"text": "a", "label": 7}])
    assert "must be 1/0" in error_of(load_prompts, bad_label)
    assert "must be 1" in error_of(load_prompts, write(tmp_path / "t.txt", "a\n"), label=2)
    dup = write_json(tmp_path / "d.json", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    assert "repeats the id 'x'" in error_of(load_prompts, dup)
    dup_pairs = write_json(tmp_path / "dp.json", pairs_doc([pair("p1"), pair("p1", "Q?", "R?")]))
    assert "repeats an earlier pair id" in error_of(load_prompts, dup_pairs)


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

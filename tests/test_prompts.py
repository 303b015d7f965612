"""Prompt sets: bundled data, every loader format and the bad-input messages (selection: test_prompt_selection)."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from alignment_artifacts.errors import UserError
from alignment_artifacts.prompts import (
    BUILTIN_SETS,
    Prompt,
    load_builtin,
    load_prompts,
    validate_pairs_file,
)
from prompt_files import error_of, pair, pairs_doc, write, write_json

CATEGORIES = {"technical_dangerous", "social_political", "personal_harmful", "medical_ethics",
              "information_deception"}
DATA = resources.files("alignment_artifacts.prompts").joinpath("data")


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

"""The bundled ordinary set: size per split and category, no repeats, nothing sensitive, NAME:SPLIT specs."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from importlib import resources

import pytest

from alignment_artifacts.errors import UserError
from alignment_artifacts.prompts import load_builtin, resolve_prompts, validate_pairs_file
from alignment_artifacts.prompts.loaders import _only_split

DATA = resources.files("alignment_artifacts.prompts").joinpath("data")
# Words the ordinary set must avoid even in a harmless sense (the borderline set covers those).
SENSITIVE = {"kill", "bomb", "weapon", "drug", "hack", "steal", "stole", "stolen", "attack", "shoot", "shot",
             "poison", "gun", "knife", "knives", "blade", "sword", "arrow", "bullet", "explosive", "explode",
             "murder", "blood", "dead", "death", "die", "dying", "suicide", "violence", "violent", "war",
             "fight", "fought", "crime", "criminal", "terror", "abuse", "harm", "hurt", "assault", "threat",
             "trigger", "exploit", "malware", "virus", "cut", "cutting", "stab", "hang", "smoke", "burn",
             "fire", "alcohol", "beer", "wine", "weed", "cocaine", "overdose", "gamble", "illegal", "prison",
             "police", "army", "military", "hunt", "prey", "venom", "toxic", "dangerous", "destroy", "crash"}
SUFFIXES = ("", "s", "es", "d", "ed", "ing", "er", "ers")
STOPWORDS = {"a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "with", "my", "i", "do", "how", "what",
             "is", "are", "be", "can", "it", "that", "this", "me", "your", "you", "should", "does", "why", "which",
             "at", "by", "from", "as", "about", "into", "so", "when", "who"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def sensitive_words(text: str) -> set[str]:
    return {w for w in words(text) for suffix in SUFFIXES
            if w.endswith(suffix) and w[:len(w) - len(suffix)] in SENSITIVE}


def document(name: str) -> dict:
    return json.loads(DATA.joinpath(name).read_text(encoding="utf-8"))


def test_sizes_per_split_and_category() -> None:
    doc = document("ordinary.json")
    full, train, val = load_builtin("ordinary"), resolve_prompts("ordinary:train"), resolve_prompts("ordinary:val")
    assert len(full) >= 440 and len(val) >= 220 and len(train) >= 220
    assert set(full.labels) == {0} and not full.paired
    assert (train.name, val.name) == ("ordinary:train", "ordinary:val")
    assert {item["split"] for item in doc["instructions"]} == {"train", "val"}
    assert sorted(p.id for p in train.prompts + val.prompts) == sorted(p.id for p in full.prompts)
    assert len(doc["categories"]) >= 20 and all(doc["categories"].values())
    per_train, per_val = Counter(p.category for p in train.prompts), Counter(p.category for p in val.prompts)
    for category in doc["categories"]:
        assert 20 <= per_train[category] + per_val[category] <= 25, category
        assert abs(per_train[category] - per_val[category]) <= 1, category
    assert set(per_train) | set(per_val) == set(doc["categories"])
    with resources.as_file(DATA.joinpath("ordinary.json")) as path:
        assert validate_pairs_file(path) == []


def test_ids_and_texts_are_unique_and_apart_from_harmless() -> None:
    prompts = load_builtin("ordinary").prompts
    assert len({p.id for p in prompts}) == len(prompts)
    texts = [normalise(p.text) for p in prompts]
    repeated = [t for t, n in Counter(texts).items() if n > 1]
    assert not repeated
    assert not set(texts) & {normalise(p.text) for p in load_builtin("harmless").prompts}


def test_no_near_duplicates() -> None:
    """Two prompts sharing most of their content words would count one request twice."""
    content = {p.text: set(words(p.text)) - STOPWORDS for p in load_builtin("ordinary").prompts}
    close = [(a, b) for (a, wa), (b, wb) in itertools.combinations(content.items(), 2)
             if len(wa & wb) / len(wa | wb) >= 0.7]
    assert not close


def test_lengths_and_no_sensitive_words() -> None:
    prompts = load_builtin("ordinary").prompts
    lengths = [len(p.text.split()) for p in prompts]
    assert min(lengths) >= 4 and max(lengths) <= 60
    flagged = {p.id: sensitive_words(p.text) for p in prompts if sensitive_words(p.text)}
    assert not flagged
    assert sensitive_words("Killing time, he cut the bread.") == {"killing", "cut"}  # the check itself works


def test_unknown_split_lists_the_real_ones() -> None:
    with pytest.raises(UserError) as err:
        resolve_prompts("ordinary:test")
    assert "no split 'test'" in str(err.value) and "train, val" in str(err.value)
    with pytest.raises(UserError) as err:
        resolve_prompts("ordinary:vall")
    assert "Did you mean 'val'?" in str(err.value)
    for spec in ("pairs:val", "harmless:train", "instructions:val"):
        with pytest.raises(UserError) as err:
            resolve_prompts(spec)
        assert "has no splits" in str(err.value) and "ordinary:val" in str(err.value)


def test_builtins_without_split_are_unchanged() -> None:
    assert [p.text for p in resolve_prompts("harmless").prompts] == [
        item["text"] for item in document("harmless.json")["instructions"]]
    assert len(load_builtin("ordinary", split=None)) == len(document("ordinary.json")["instructions"])


def test_split_selection_works_for_any_schema() -> None:
    pairs_doc = {"pairs": [{"id": "a", "natural": "x", "artifact": "y", "split": "train"},
                           {"id": "b", "natural": "z", "artifact": "w", "split": "val"}]}
    assert [pair["id"] for pair in _only_split(pairs_doc, "mine", "val")["pairs"]] == ["b"]

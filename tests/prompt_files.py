"""Helpers for the prompt-set tests: write prompt files, build pairs documents, catch a UserError's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alignment_artifacts.errors import UserError


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


def error_of(func: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(UserError) as err:
        func(*args, **kwargs)
    return str(err.value)

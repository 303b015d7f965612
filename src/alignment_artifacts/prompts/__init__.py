"""Prompt sets: bundled contrastive pairs and instructions, file and Hub loaders, and a validator."""

from __future__ import annotations

from .loaders import (
    BUILTIN_SETS,
    load_builtin,
    load_contrast,
    load_hf_dataset,
    load_prompts,
    resolve_prompts,
    select,
)
from .sets import Prompt, PromptSet
from .validate import validate_pairs_file

__all__ = [
    "BUILTIN_SETS",
    "Prompt",
    "PromptSet",
    "load_builtin",
    "load_contrast",
    "load_hf_dataset",
    "load_prompts",
    "resolve_prompts",
    "select",
    "validate_pairs_file",
]

"""Prompt sets: bundled contrastive pairs, instructions and borderline prompts, judge calibration items,
file and Hub loaders, and a validator."""

from __future__ import annotations

from .evalsets import (
    CALIBRATION_LABELS,
    CalibrationItem,
    load_calibration,
)
from .loaders import (
    BUILTIN_SETS,
    load_builtin,
    load_contrast,
    load_hf_dataset,
    load_prompts,
    resolve_prompts,
)
from .sets import Prompt, PromptSet
from .subset import select
from .validate import validate_pairs_file

__all__ = [
    "BUILTIN_SETS",
    "CALIBRATION_LABELS",
    "CalibrationItem",
    "Prompt",
    "PromptSet",
    "load_builtin",
    "load_calibration",
    "load_contrast",
    "load_hf_dataset",
    "load_prompts",
    "resolve_prompts",
    "select",
    "validate_pairs_file",
]

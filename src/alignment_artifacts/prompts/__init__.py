"""Prompt sets: bundled contrastive pairs, instructions and borderline prompts, judge calibration items,
file and Hub loaders, and a validator."""

from __future__ import annotations

from .evalsets import (
    BORDERLINE_SPLITS,
    CALIBRATION_LABELS,
    CalibrationItem,
    borderline_split,
    load_calibration,
)
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
    "BORDERLINE_SPLITS",
    "BUILTIN_SETS",
    "CALIBRATION_LABELS",
    "CalibrationItem",
    "Prompt",
    "PromptSet",
    "borderline_split",
    "load_builtin",
    "load_calibration",
    "load_contrast",
    "load_hf_dataset",
    "load_prompts",
    "resolve_prompts",
    "select",
    "validate_pairs_file",
]

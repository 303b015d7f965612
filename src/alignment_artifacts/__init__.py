"""alignment-artifacts: measure and steer the directions safety training leaves in activations."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AlignmentArtifacts": "api", "suppress_prompt": "api", "steer": "api", "get_directions": "api",
    "load_model": "models", "collect_activations": "activations", "ActivationStore": "activations",
    "analyze": "analysis", "SteeringConfig": "steering", "Steering": "steering", "DirectionSet": "analysis.directions",
    "load_steering": "export",
}


def __getattr__(name: str) -> Any:
    """Import heavy submodules (torch, transformers) only when their names are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'alignment_artifacts' has no attribute {name!r}")


__all__ = sorted(_LAZY)

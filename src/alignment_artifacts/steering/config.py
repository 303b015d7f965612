"""``SteeringConfig``: the JSON-stable description of one intervention (mode knobs from ``MODES``)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..analysis.directions import check_variant
from ..errors import UserError, closest
from ..models.adapter import SITES
from .modes import GATE_LEVEL, PARAMS, ModeSpec, mode_spec

CONFIG_VERSION = 1
_DEFAULT = {name: p.default for name, p in PARAMS.items()}


@dataclass
class SteeringConfig:
    """Everything that defines a steering intervention; its JSON form is stable across versions."""

    mode: str = "ablate"
    scale: float | None = None  # steering strength s; None = the mode's default (``auto``: the stored one)
    layers: list[int] | None = None  # target layers (0-based); None = the mode's default
    site: str | None = None  # hooked site; None = the mode's default
    categories: list[str] | None = None  # directions from these categories only
    proximity_threshold: float = _DEFAULT["proximity_threshold"]
    distance_threshold: float = _DEFAULT["distance_threshold"]
    decay_rate: float = _DEFAULT["decay_rate"]
    pca_components: int = int(_DEFAULT["pca_components"])
    clamp_level: float = _DEFAULT["clamp_level"]  # clamp: the cap's place between the ordinary (0) and sensitive (1)
    direction_variant: str = "mean_diff"  # how directions are computed: one of analysis.directions.VARIANTS
    benign_components: int = int(_DEFAULT["benign_components"])  # variant benign_subspace: principal axes removed
    direction_layer: int | None = None  # use this layer's direction everywhere (None: each layer its own)
    gate_layer: int | None = None  # steer only prompts whose projection here passes gate_level (None: all)
    gate_level: float = GATE_LEVEL.default  # the gate's place between the ordinary (0) and sensitive (1) means
    layer_weights: dict[int, float] | None = None  # per-layer multipliers of the scale (a kernel over layers)
    source: str | None = None  # prompt set the directions come from (None: the mode's default)
    direction_site: str | None = None
    direction_position: str | None = None
    model_id: str = ""
    weights_hash: str = ""
    notes: dict[str, Any] = field(default_factory=dict)  # provenance for people; never read as control flow

    @property
    def spec(self) -> ModeSpec:
        return mode_spec(self.mode)

    def validate(self, n_layers: int | None = None) -> None:
        spec = self.spec
        if self.scale is not None:
            if not math.isfinite(self.scale):
                raise UserError(f"--scale must be a finite number (got {self.scale}).")
            if spec.steers and self.scale < 0:
                raise UserError(f"--scale must be >= 0 (got {self.scale}); use --mode amplify to add the "
                                "direction.")
        for name, param in PARAMS.items():
            param.check(getattr(self, name))
        GATE_LEVEL.check(self.gate_level)
        if self.gate_layer is not None:
            spec.require_hooks("be gated per prompt (gate_layer)")
        check_variant(self.direction_variant)
        for name in ("site", "direction_site"):
            value = getattr(self, name)
            if value is not None and value not in SITES:
                raise UserError(f"Unknown site '{value}'.{closest(value, SITES)} Valid sites: {', '.join(SITES)}.")
        if n_layers is not None:
            candidates = list(self.layers or []) + list((self.layer_weights or {}).keys())
            candidates += [x for x in (self.direction_layer, self.gate_layer) if x is not None]
            bad = sorted({x for x in candidates if not 0 <= x < n_layers})
            if bad:
                raise UserError(f"Layer(s) {bad} are out of range: this model has {n_layers} decoder blocks, "
                                f"numbered 0 to {n_layers - 1}.")

    def with_default_scale(self) -> SteeringConfig:
        """The configuration with ``scale`` filled from its mode's default when unset."""
        return self if self.scale is not None else replace(self, scale=self.spec.default_scale)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = CONFIG_VERSION
        if self.layer_weights is not None:
            data["layer_weights"] = {str(k): v for k, v in self.layer_weights.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise UserError(f"Unknown steering configuration field(s): {', '.join(unknown)}. Known: "
                            f"{', '.join(sorted(known))}.")
        values = {k: v for k, v in data.items() if k in known}
        if values.get("layer_weights") is not None:
            values["layer_weights"] = {int(k): float(v) for k, v in values["layer_weights"].items()}
        config = cls(**values)
        config.validate()
        return config

    def save(self, path: str | Path) -> None:
        from ..cache import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SteeringConfig:
        """A configuration file: a bare configuration, or what ``optimize`` stored (the configuration under
        ``config``, beside the numbers behind the choice), so ``--config configs/<model>.json`` works."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"Could not read the steering configuration {path}: {exc}.") from exc
        return cls.from_json(data["config"] if isinstance(data, dict) and isinstance(data.get("config"), dict)
                             else data)

    # Defaults that depend on the mode -------------------------------------------------------
    @property
    def uses_refusal_direction(self) -> bool:
        return self.spec.refusal_direction

    def resolved_source(self) -> str:
        return self.source or ("instructions" if self.uses_refusal_direction else "pairs")

    def resolved_direction_site(self) -> str:
        if self.direction_site:
            return self.direction_site
        if self.uses_refusal_direction:
            return "resid_pre"
        return self.site or "mlp_out"

    def resolved_direction_position(self) -> str:
        return self.direction_position or ("first_generated" if self.uses_refusal_direction else "last")

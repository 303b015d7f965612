"""What ``analyze`` returns and saves: per-cell statistics, the whole result, and its files.

Results schema (``results.json``, ``SCHEMA_VERSION``)::

    schema_version, kind, package_version, created, elapsed_s
    model:      model_id, weights_hash, hidden_size, dtype (from the store manifest)
    prompt_set: name, hash, paired, n_prompts, n_positive, n_negative, n_pairs, categories{...}
    config:     site, position, layers, categories, n_permutations, n_bootstrap, folds,
                pca_components, method, seed, alpha, ci_level, permutation_statistic,
                direction_variant, statistics_variant (the variant the rows measure: the
                direction variant's own, mean_diff for median), benign_components (benign_subspace)
    sources:    ["pooled", <category>, ...]        layers: [int, ...]
    rows:       one dict per source x layer, keys ``ROW_FIELDS``: category ("pooled" or a name),
                layer, counts, g (== heldout_g, the headline) with ci_low/ci_high, held-out
                accuracy/AUROC, p_value (permutation) with p_holm/p_fdr across layers and
                significant (p_holm < alpha), in_sample_* (optimistic), direction_norm
    cosine:     categories{<layer>: {labels, matrix}}, layers{<source>: {layers, matrix}}
    recommended_layers, recommendation (reason), top_layer
    hypotheses: {H1: {claim, estimate, ci, supported, note}, H2: {...}}
    projection: {source, layer, x, y, label, category} (2-D view of the top layer)
    warnings:   [str, ...]
    files:      {csv, figures: [...], directions: {source: folder}} (added by ``save``)

Non-finite numbers are written as ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import atomic_directory, atomic_write_bytes, atomic_write_json
from ..errors import UserError
from .directions import DirectionSet
from .hypotheses import Hypothesis

SCHEMA_VERSION = 1
POOLED = "pooled"

ROW_FIELDS = (
    "category", "layer", "n", "n_positive", "n_negative", "n_pairs", "paired",
    "g", "ci_low", "ci_high", "heldout_g", "heldout_accuracy", "heldout_auroc",
    "p_value", "p_holm", "p_fdr", "significant",
    "in_sample_g", "in_sample_ci_low", "in_sample_ci_high", "in_sample_accuracy", "in_sample_auroc",
    "direction_norm",
)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alignment-artifacts")
    except PackageNotFoundError:
        from .. import __version__

        return str(__version__)


def clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return clean(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


@dataclass
class CellStats:
    """Statistics of one source (category or pooled) at one layer; see ``ROW_FIELDS``."""

    category: str
    layer: int
    n: int
    n_positive: int
    n_negative: int
    n_pairs: int
    paired: bool
    heldout_g: float
    ci_low: float
    ci_high: float
    heldout_accuracy: float
    heldout_auroc: float
    in_sample_g: float
    in_sample_ci_low: float
    in_sample_ci_high: float
    in_sample_accuracy: float
    in_sample_auroc: float
    p_value: float
    direction_norm: float
    p_holm: float = math.nan
    p_fdr: float = math.nan
    significant: bool = False

    @property
    def g(self) -> float:
        return self.heldout_g

    def row(self) -> dict[str, Any]:
        values = asdict(self) | {"g": self.g}
        return {key: clean(values[key]) for key in ROW_FIELDS}


@dataclass
class AnalysisResult:
    """Everything ``analyze`` found; ``to_json`` is the stable, documented form."""

    site: str
    position: str
    layers: list[int]
    sources: list[str]
    cells: list[CellStats]
    model: dict[str, Any]
    prompt_set: dict[str, Any]
    config: dict[str, Any]
    category_cosine: dict[int, np.ndarray]
    layer_cosine: dict[str, np.ndarray]
    recommended_layers: list[int]
    recommendation: str
    top_layer: int | None
    hypotheses: dict[str, Hypothesis]
    projection: dict[str, Any]
    directions: dict[str, DirectionSet]
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    created: str = ""
    package_version: str = ""

    def rows(self) -> list[dict[str, Any]]:
        return [cell.row() for cell in self.cells]

    def to_json(self) -> dict[str, Any]:
        categories = [s for s in self.sources if s != POOLED]
        return clean({
            "schema_version": SCHEMA_VERSION, "kind": "alignment_artifacts.analysis",
            "package_version": self.package_version, "created": self.created, "elapsed_s": self.elapsed_s,
            "model": self.model, "prompt_set": self.prompt_set, "config": self.config,
            "sources": self.sources, "layers": self.layers, "rows": self.rows(),
            "cosine": {
                "categories": {str(layer): {"labels": categories, "matrix": m}
                               for layer, m in self.category_cosine.items()},
                "layers": {src: {"layers": self.layers, "matrix": m} for src, m in self.layer_cosine.items()},
            },
            "recommended_layers": self.recommended_layers, "recommendation": self.recommendation,
            "top_layer": self.top_layer,
            "hypotheses": {key: h.to_dict() for key, h in self.hypotheses.items()},
            "projection": self.projection, "warnings": self.warnings,
        })

    def csv_bytes(self) -> bytes:
        return rows_to_csv(self.rows())

    def save(self, folder: str | Path) -> Path:
        """Write results.json, results.csv, figures/*.png and directions/<source>/ atomically
        (the folder is replaced as a whole, so it is never half-written)."""
        from .figures import save_figures

        folder = Path(folder)
        data = self.to_json()
        with atomic_directory(folder, overwrite=True) as tmp:
            figures = save_figures(data, tmp / "figures")
            direction_dirs = {}
            for source, direction_set in self.directions.items():
                rel = f"directions/{folder_name(source)}"
                direction_set.save(tmp / rel)
                direction_dirs[source] = rel
            atomic_write_bytes(tmp / "results.csv", self.csv_bytes())
            data["files"] = {"csv": "results.csv", "figures": [f"figures/{p.name}" for p in figures],
                             "directions": direction_dirs}
            atomic_write_json(tmp / "results.json", data)
        return folder


def rows_to_csv(rows: Iterable[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in ROW_FIELDS})
    return buffer.getvalue().encode()


def folder_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source) or "_"


def load_result(folder: str | Path) -> dict[str, Any]:
    """The saved results.json of an analysis folder, checked for a schema this version reads."""
    path = Path(folder) / "results.json"
    if not path.exists():
        raise UserError(f"{folder} does not hold analysis results (no results.json). Create them with "
                        "`alignment-artifacts analyze`.")
    data = json.loads(path.read_text())
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{path} has results schema version {version!r}, but this version of "
                        f"alignment-artifacts reads up to {SCHEMA_VERSION}. Upgrade the package or re-run "
                        "`alignment-artifacts analyze`.")
    return data

"""``analyze``: from an activation store to per-layer, per-category artifact statistics.

For every *source* (all prompts pooled, then each category) and every layer it fits the
mean-difference direction and reports honest numbers (see ``stats``): the cross-fitted effect
size with a pair-bootstrap CI (direction refitted in every resample), held-out accuracy and
AUROC, a refit permutation test corrected across layers (Holm for the ``significant`` flag, BH
alongside), and in-sample numbers labelled as such. On top: cosine similarities between
directions, recommended layers, the two hypotheses, and one ``DirectionSet`` per source for
steering.

Results schema (``results.json``, ``SCHEMA_VERSION``)::

    schema_version, kind, package_version, created, elapsed_s
    model:      model_id, weights_hash, hidden_size, dtype (from the store manifest)
    prompt_set: name, hash, paired, n_prompts, n_positive, n_negative, n_pairs, categories{...}
    config:     site, position, layers, categories, n_permutations, n_bootstrap, folds,
                pca_components, method, seed, alpha, ci_level, permutation_statistic
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
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..cache import atomic_directory, atomic_write_bytes, atomic_write_json
from ..errors import UserError, closest
from . import stats
from .directions import DirectionSet, direction_from_groups

if TYPE_CHECKING:
    from ..activations import ActivationStore
    from ..prompts.sets import Prompt

SCHEMA_VERSION = 1
POOLED = "pooled"
PREFERRED_SITE = "mlp_out"
PREFERRED_POSITION = "last"
H2_CATEGORY = "social_political"

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
    hypotheses: dict[str, stats.Hypothesis]
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


# --------------------------------------------------------------------------- choosing what to analyse


def _pick(kind: str, requested: str | None, available: Sequence[str], preferred: str) -> str:
    if not available:
        raise UserError(f"The activation store holds no {kind}s. Re-run `alignment-artifacts collect`.")
    if requested is None:
        return preferred if preferred in available else available[0]
    if requested not in available:
        raise UserError(f"The activation store has no {kind} '{requested}' (it has {', '.join(available)})."
                        f"{closest(requested, available)} Collect it with `alignment-artifacts collect`.")
    return requested


def _pick_position(store: ActivationStore, position: str | None) -> str:
    pooled = [p for p in store.positions if not p.startswith("generated:")]
    if position is not None and position.startswith("generated:"):
        raise UserError(f"Position '{position}' holds one vector per generated token; analyse a "
                        f"single-vector position instead ({', '.join(pooled) or 'none collected'}).")
    if not pooled:
        raise UserError("The activation store only holds per-token generated positions; collect a position "
                        "such as 'last' or 'mean' with `alignment-artifacts collect --positions last`.")
    return _pick("position", position, pooled, PREFERRED_POSITION)


def _pick_layers(store: ActivationStore, layers: Sequence[int] | None) -> list[int]:
    available = sorted(store.layers)
    if layers is None:
        return available
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise UserError(f"Layer(s) {missing} are not in the activation store (it has layers {available}). "
                        "Collect them with `alignment-artifacts collect --layers ...`.")
    return sorted(set(layers))


def _sources(prompts: Sequence[Prompt], categories: Sequence[str] | None) -> dict[str, np.ndarray]:
    present = list(dict.fromkeys(p.category for p in prompts if p.category is not None))
    if categories is not None:
        for cat in categories:
            if cat not in present:
                raise UserError(f"Category '{cat}' is not in this prompt set (it has "
                                f"{', '.join(present) or 'no categories'}).{closest(cat, present)}")
        present = [c for c in present if c in categories]
        pooled_rows = np.flatnonzero([p.category in present for p in prompts])
    else:
        pooled_rows = np.arange(len(prompts))
    out = {POOLED: pooled_rows}
    for cat in present:
        out[cat] = np.flatnonzero([p.category == cat for p in prompts])
    return out


def _design(prompts: Sequence[Prompt], rows: np.ndarray) -> stats.Design:
    chosen = [prompts[i] for i in rows]
    groups = [(p.category, p.pair_id) if p.pair_id is not None else None for p in chosen]
    return stats.Design.build([p.label for p in chosen], groups)


def _identity(store: ActivationStore, hidden_size: int) -> dict[str, Any]:
    manifest = dict(getattr(store, "manifest", None) or {})
    return {
        "model_id": str(manifest.get("model_id") or manifest.get("model") or ""),
        "weights_hash": str(manifest.get("weights_hash") or ""),
        "hidden_size": int(manifest.get("hidden_size") or hidden_size),
        "dtype": str(manifest.get("dtype") or ""),
    }


def _prompt_set_info(store: ActivationStore, sources: dict[str, np.ndarray],
                     designs: dict[str, stats.Design]) -> dict[str, Any]:
    manifest = dict(getattr(store, "manifest", None) or {})
    pooled = designs[POOLED]

    def counts(design: stats.Design) -> dict[str, Any]:
        return {"n": design.n, "n_positive": design.n_positive, "n_negative": design.n_negative,
                "n_pairs": design.n_clusters if design.paired else 0, "paired": design.paired}

    return {"name": str(manifest.get("prompt_set_name") or ""),
            "hash": str(manifest.get("prompt_set_hash") or ""),
            "n_prompts": pooled.n, **{k: v for k, v in counts(pooled).items() if k != "n"},
            "categories": {src: counts(designs[src]) for src in sources if src != POOLED and src in designs}}


# --------------------------------------------------------------------------- per-source state


@dataclass
class _Source:
    """What stays fixed for a source across layers: rows, folds, resamples, permutations."""

    name: str
    rows: np.ndarray
    design: stats.Design
    fold: np.ndarray
    boot: np.ndarray
    perms: np.ndarray
    replicates: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [B] refit held-out g

    @classmethod
    def build(cls, name: str, index: int, rows: np.ndarray, design: stats.Design, *, seed: int,
              folds: stats.Folds, n_bootstrap: int, n_permutations: int) -> _Source:
        fold_rng, boot_rng, perm_rng = (np.random.default_rng([seed, index, k]) for k in range(3))
        return cls(name, rows, design, stats.assign_folds(design, folds, fold_rng),
                   stats.resample_weights(design, n_bootstrap, boot_rng),
                   stats.permuted_labels(design, n_permutations, perm_rng))


def _cell(src: _Source, layer: int, x: torch.Tensor, g: np.ndarray, level: float, heldout_test: bool
          ) -> CellStats:
    """All statistics of one source at one layer (``g``: its centred Gram); refit bootstrap
    replicates are kept on ``src`` for the hypotheses."""
    design, pos = src.design, src.design.positive
    sep = stats.separability_from_gram(g, design, src.fold)
    perm = stats.permutation_test_from_gram(g, design, src.perms, src.fold if heldout_test else None)
    reps = stats.refit_g(g, pos, src.boot, src.fold)
    ci_low, ci_high = stats.interval(sep.heldout_g, reps, None, level, "centred")
    in_low, in_high = stats.interval(sep.in_sample_g, stats.refit_g(g, pos, src.boot), None, level, "centred")
    src.replicates[layer] = reps
    xd = x.numpy().astype(np.float64)
    norm = float(np.linalg.norm(xd[pos].mean(0) - xd[~pos].mean(0)))
    return CellStats(src.name, layer, design.n, design.n_positive, design.n_negative,
                     design.n_clusters if design.paired else 0, design.paired, sep.heldout_g, ci_low, ci_high,
                     sep.heldout_accuracy, sep.heldout_auroc, sep.in_sample_g, in_low, in_high,
                     sep.in_sample_accuracy, sep.in_sample_auroc, perm.p_value, norm)


def _direction_parts(x: torch.Tensor, design: stats.Design, method: str, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(vector, positive centre, negative centre, PCA basis). The PCA basis is of the centred paired
    differences when pairs exist; unpaired, each positive row is paired with the negative centroid,
    i.e. the principal variation of the sensitive group around its own mean."""
    pos_t, neg_t = torch.as_tensor(design.positive), torch.as_tensor(~design.positive)
    vector, pos_centre, neg_centre = direction_from_groups(x[pos_t], x[neg_t], method)
    rows = x.numpy().astype(np.float64)
    if k <= 0:
        return vector, pos_centre, neg_centre, None
    if design.paired:
        pos_idx, neg_idx = design.pairs()
        diffs = rows[pos_idx] - rows[neg_idx]
    else:
        diffs = rows[design.positive] - neg_centre.numpy().astype(np.float64)
    return vector, pos_centre, neg_centre, stats.principal_axes(diffs, k)


def _projection(x: torch.Tensor, design: stats.Design, prompts: Sequence[Prompt], rows: np.ndarray,
                layer: int, source: str) -> dict[str, Any]:
    """x: projection on the (in-sample) unit direction; y: first PC of what is orthogonal to it."""
    xc = x.numpy().astype(np.float64)
    xc -= xc.mean(0, keepdims=True)
    direction = xc[design.positive].mean(0) - xc[~design.positive].mean(0)
    unit = direction / max(float(np.linalg.norm(direction)), 1e-12)
    along = stats.matmul(xc, unit)
    residual = xc - along[:, None] * unit[None, :]
    across = stats.matmul(residual, stats.principal_axes(residual, 1)[0].numpy().astype(np.float64))
    return {"source": source, "layer": layer, "x": np.round(along, 5), "y": np.round(across, 5),
            "label": design.positive.astype(int), "category": [prompts[i].category or "" for i in rows]}


# --------------------------------------------------------------------------- analyze


def analyze(store: ActivationStore, *, site: str | None = None, position: str | None = None,
            layers: Sequence[int] | None = None, categories: Sequence[str] | None = None,
            n_permutations: int = 1000, n_bootstrap: int = 2000, folds: stats.Folds = 5,
            pca_components: int = 5, method: str = "mean", seed: int = 0, progress: bool = True,
            alpha: float = 0.05, ci_level: float = 0.95,
            permutation_statistic: Literal["in_sample", "heldout"] = "heldout") -> AnalysisResult:
    """Measure the artifact direction per category and layer; see the module docstring for outputs.

    ``method`` ("mean" or "median") only changes the saved steering directions and the cosines;
    the statistics always use the mean difference, whose linearity makes refitting per fold and
    per permutation exact and cheap. Folds, bootstrap resamples and permutations are drawn once per
    source from ``seed`` and shared by all layers, so layers are compared on the same resamples.
    ``permutation_statistic``: the refitted cross-fitted g ("heldout", default) or the refitted
    in-sample g ("in_sample"), which loses power on anisotropic activations (see
    ``stats.permutation_test``). Runs with one torch thread (restored afterwards), which is fastest
    for these small problems.
    """
    with stats.threads(1):
        return _analyze(store, site=site, position=position, layers=layers, categories=categories,
                        n_permutations=n_permutations, n_bootstrap=n_bootstrap, folds=folds,
                        pca_components=pca_components, method=method, seed=seed, progress=progress, alpha=alpha,
                        ci_level=ci_level, permutation_statistic=permutation_statistic)


def _analyze(store: ActivationStore, *, site: str | None, position: str | None, layers: Sequence[int] | None,
             categories: Sequence[str] | None, n_permutations: int, n_bootstrap: int, folds: stats.Folds,
             pca_components: int, method: str, seed: int, progress: bool, alpha: float, ci_level: float,
             permutation_statistic: str) -> AnalysisResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if method not in ("mean", "median"):
        raise UserError(f"Unknown direction method '{method}'. Use 'mean' or 'median'.")
    if permutation_statistic not in ("in_sample", "heldout"):
        raise UserError(f"Unknown permutation statistic '{permutation_statistic}'. Use 'in_sample' or "
                        "'heldout'.")
    if n_permutations < 1 or n_bootstrap < 10:
        raise UserError("Use at least 1 permutation and 10 bootstrap resamples (defaults: 1000 and 2000).")
    site = _pick("site", site, list(store.sites), PREFERRED_SITE)
    position = _pick_position(store, position)
    layer_list = _pick_layers(store, layers)
    prompts = list(store.prompts)
    rows_by_source = _sources(prompts, categories)
    warnings: list[str] = []
    designs: dict[str, stats.Design] = {}
    for name, rows in rows_by_source.items():
        design = _design(prompts, rows)
        if min(design.n_positive, design.n_negative) < 2:
            message = (f"'{name}' has {design.n_positive} sensitive and {design.n_negative} ordinary "
                       "prompts; at least 2 of each are needed.")
            if name == POOLED:
                raise UserError(message + " Use a prompt set with both groups.")
            warnings.append(message + " Skipped.")
            continue
        designs[name] = design
    sources = [
        _Source.build(name, i, rows_by_source[name], designs[name], seed=seed, folds=folds,
                      n_bootstrap=n_bootstrap, n_permutations=n_permutations)
        for i, name in enumerate(designs)
    ]

    cells: dict[tuple[str, int], CellStats] = {}
    parts: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    hidden = 0
    bar = tqdm(total=len(sources) * len(layer_list), desc="analyze", unit="cell", disable=not progress)
    used = np.unique(np.concatenate([src.rows for src in sources]))
    for layer in layer_list:
        acts = store.get(site, layer, position).detach().float().cpu()
        hidden = int(acts.shape[-1])
        full_gram = np.zeros((acts.shape[0], acts.shape[0]))
        full_gram[np.ix_(used, used)] = stats.gram(acts[torch.as_tensor(used)])
        for src in sources:
            bar.set_postfix_str(f"{src.name} L{layer}", refresh=False)
            x = acts[torch.as_tensor(src.rows)]
            g = stats.centre_gram(full_gram[np.ix_(src.rows, src.rows)])
            cells[src.name, layer] = _cell(src, layer, x, g, ci_level, permutation_statistic == "heldout")
            parts[src.name, layer] = _direction_parts(x, src.design, method, pca_components)
            bar.update()
    bar.close()

    for src in sources:
        p = [cells[src.name, layer].p_value for layer in layer_list]
        for layer, p_holm, p_fdr in zip(layer_list, stats.holm(p), stats.benjamini_hochberg(p), strict=True):
            cell = cells[src.name, layer]
            cell.p_holm, cell.p_fdr = float(p_holm), float(p_fdr)
            cell.significant = bool(p_holm < alpha)

    names = [src.name for src in sources]
    categories_found = [n for n in names if n != POOLED]
    category_cosine = {
        layer: stats.cosine_matrix(torch.stack([parts[c, layer][0] for c in categories_found]))
        for layer in layer_list} if categories_found else {}
    layer_cosine = {n: stats.cosine_matrix(torch.stack([parts[n, layer][0] for layer in layer_list]))
                    for n in names}

    pooled_cells = [cells[POOLED, layer] for layer in layer_list]
    recommended, reason = stats.recommend_layers(layer_list, [c.ci_low for c in pooled_cells])
    ranked = recommended or layer_list[1:-1] or layer_list
    top_layer = max(ranked, key=lambda layer: np.nan_to_num(cells[POOLED, layer].ci_low, nan=-np.inf))

    by_name = {src.name: src for src in sources}
    pooled_src = by_name[POOLED]
    target = H2_CATEGORY if H2_CATEGORY in categories_found else next(
        (c for c in categories_found if "politic" in c), H2_CATEGORY)
    hypotheses = {
        "H1": stats.early_layer_hypothesis(
            layer_list, [c.heldout_g for c in pooled_cells],
            np.stack([pooled_src.replicates[layer] for layer in layer_list], axis=1),
            site=site, level=ci_level),
        "H2": stats.category_hypothesis(
            target, {c: [cells[c, layer].heldout_g for layer in recommended] for c in categories_found},
            {c: np.stack([by_name[c].replicates[layer] for layer in recommended], axis=1) if recommended
             else np.zeros((n_bootstrap, 0)) for c in categories_found},
            layers=recommended, level=ci_level),
    }

    top_acts = store.get(site, top_layer, position).detach().float().cpu()
    top_acts = top_acts[torch.as_tensor(pooled_src.rows)]
    projection = _projection(top_acts, pooled_src.design, prompts, pooled_src.rows, top_layer, POOLED)

    model = _identity(store, hidden)
    prompt_info = _prompt_set_info(store, rows_by_source, designs)
    directions = {
        src.name: DirectionSet(
            site=site, position=position, source=src.name,
            vectors={layer: parts[src.name, layer][0] for layer in layer_list},
            positive_mean={layer: parts[src.name, layer][1] for layer in layer_list},
            negative_mean={layer: parts[src.name, layer][2] for layer in layer_list},
            pca={layer: basis for layer in layer_list if (basis := parts[src.name, layer][3]) is not None},
            method=method,
            model_id=model["model_id"], weights_hash=model["weights_hash"], hidden_size=model["hidden_size"],
            prompt_set_hash=prompt_info["hash"], n_positive=src.design.n_positive,
            n_negative=src.design.n_negative,
            extra=clean({"paired": src.design.paired, "prompt_set_name": prompt_info["name"],
                         "pca_basis": "centred paired differences" if src.design.paired
                         else "positive rows minus the negative centroid, centred",
                         "recommended_layers": recommended,
                         "heldout_g": {str(layer): cells[src.name, layer].heldout_g for layer in layer_list},
                         "analysis_schema_version": SCHEMA_VERSION}))
        for src in sources
    }
    config = {"site": site, "position": position, "layers": layer_list,
              "categories": list(categories) if categories is not None else None,
              "n_permutations": n_permutations, "n_bootstrap": n_bootstrap, "folds": folds,
              "pca_components": pca_components, "method": method, "seed": seed, "alpha": alpha,
              "ci_level": ci_level, "permutation_statistic": permutation_statistic}
    return AnalysisResult(
        site=site, position=position, layers=layer_list, sources=names,
        cells=[cells[n, layer] for n in names for layer in layer_list], model=model,
        prompt_set=prompt_info, config=config, category_cosine=category_cosine, layer_cosine=layer_cosine,
        recommended_layers=recommended, recommendation=reason, top_layer=top_layer, hypotheses=hypotheses,
        projection=projection, directions=directions, warnings=warnings,
        elapsed_s=round(time.perf_counter() - start, 3),
        created=datetime.now(UTC).isoformat(timespec="seconds"), package_version=package_version())

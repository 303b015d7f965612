"""``analyze``: from an activation store to per-layer, per-category artifact statistics.

For every *source* (all prompts pooled, then each category) and every layer it fits the
mean-difference direction and reports honest numbers (see ``stats``): the cross-fitted effect
size with a pair-bootstrap CI (direction refitted in every resample), held-out accuracy and
AUROC, a refit permutation test corrected across layers (Holm for the ``significant`` flag, BH
alongside), and in-sample numbers labelled as such. On top: cosine similarities between
directions, recommended layers, the seed study's two hypotheses (``hypotheses``), and one
``DirectionSet`` per source for steering. The result and its saved schema are in ``result``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..errors import UserError, closest
from . import stats
from .directions import DirectionSet, Variant, check_variant, direction_from_groups
from .hypotheses import seed_hypotheses
from .result import POOLED, ROW_FIELDS, SCHEMA_VERSION, AnalysisResult, CellStats, clean, load_result, package_version

if TYPE_CHECKING:
    from ..activations import ActivationStore
    from ..prompts.sets import Prompt

PREFERRED_SITE = "mlp_out"
PREFERRED_POSITION = "last"

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]  # vector, centres, PCA basis

__all__ = ["POOLED", "ROW_FIELDS", "SCHEMA_VERSION", "AnalysisResult", "CellStats", "analyze", "load_result"]


def analyze(store: ActivationStore, *, site: str | None = None, position: str | None = None,
            layers: Sequence[int] | None = None, categories: Sequence[str] | None = None,
            n_permutations: int = 1000, n_bootstrap: int = 2000, folds: stats.Folds = 5,
            pca_components: int = 5, method: str = "mean", seed: int = 0, progress: bool = True,
            alpha: float = 0.05, ci_level: float = 0.95,
            permutation_statistic: Literal["in_sample", "heldout"] = "heldout", variant: str = "mean_diff",
            benign_components: int = 3) -> AnalysisResult:
    """Measure the artifact direction per category and layer; see the module docstring for outputs.

    ``method`` ("mean" or "median") only changes the saved steering directions and the cosines;
    the statistics always use the mean difference, whose linearity makes refitting per fold and
    per permutation exact and cheap. ``variant`` (``directions.VARIANTS``) changes the directions and
    the statistics: a linear variant is measured as the mean difference of its mapped rows
    (``directions.variant_features``); ``median`` has no such map, so its statistics stay those of
    the mean difference (``config.statistics_variant`` says which). Folds, bootstrap resamples and
    permutations are drawn once per source from ``seed`` and shared by all layers, so layers are
    compared on the same resamples.
    ``permutation_statistic``: the refitted cross-fitted g ("heldout", default) or the refitted
    in-sample g ("in_sample"), which loses power on anisotropic activations (see
    ``stats.permutation_test``). Runs with one torch thread (restored afterwards), which is fastest
    for these small problems.
    """
    with stats.threads(1):
        return _analyze(store, site=site, position=position, layers=layers, categories=categories,
                        n_permutations=n_permutations, n_bootstrap=n_bootstrap, folds=folds,
                        pca_components=pca_components, method=method, seed=seed, progress=progress, alpha=alpha,
                        ci_level=ci_level, permutation_statistic=permutation_statistic,
                        variant=Variant(variant, benign_components))


def _analyze(store: ActivationStore, *, site: str | None, position: str | None, layers: Sequence[int] | None,
             categories: Sequence[str] | None, n_permutations: int, n_bootstrap: int, folds: stats.Folds,
             pca_components: int, method: str, seed: int, progress: bool, alpha: float, ci_level: float,
             permutation_statistic: str, variant: Variant) -> AnalysisResult:
    start = time.perf_counter()
    _check_options(method, permutation_statistic, n_permutations, n_bootstrap, variant)
    site = _pick("site", site, list(store.sites), PREFERRED_SITE)
    position = _pick_position(store, position)
    layer_list = _pick_layers(store, layers)
    prompts = list(store.prompts)
    rows_by_source = _sources(prompts, categories)
    designs, warnings = _designs(prompts, rows_by_source)
    sources = [
        _Source.build(name, i, rows_by_source[name], designs[name], seed=seed, folds=folds,
                      n_bootstrap=n_bootstrap, n_permutations=n_permutations)
        for i, name in enumerate(designs)
    ]
    cells, parts, hidden = _measure(store, site, position, layer_list, sources, method=method, variant=variant,
                                    pca_components=pca_components, ci_level=ci_level,
                                    heldout_test=permutation_statistic == "heldout", progress=progress)
    _correct_across_layers(cells, sources, layer_list, alpha)

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
    hypotheses = seed_hypotheses(
        site, layer_list, recommended, POOLED,
        {n: {layer: cells[n, layer].heldout_g for layer in layer_list} for n in names},
        {src.name: src.replicates for src in sources}, level=ci_level, n_bootstrap=n_bootstrap)

    pooled_src = next(src for src in sources if src.name == POOLED)
    top_acts = store.get(site, top_layer, position).detach().float().cpu()
    top_acts = variant.features(top_acts[torch.as_tensor(pooled_src.rows)], pooled_src.design.positive)
    projection = _projection(top_acts, pooled_src.design, prompts, pooled_src.rows, top_layer, POOLED)

    model = _identity(store, hidden)
    prompt_info = _prompt_set_info(store, rows_by_source, designs)
    directions = {src.name: _direction_set(src, cells, parts, site=site, position=position, layers=layer_list,
                                           method=method, variant=variant, model=model,
                                           prompt_info=prompt_info, recommended=recommended)
                  for src in sources}
    config = {"site": site, "position": position, "layers": layer_list,
              "categories": list(categories) if categories is not None else None,
              "n_permutations": n_permutations, "n_bootstrap": n_bootstrap, "folds": folds,
              "pca_components": pca_components, "method": method, "seed": seed, "alpha": alpha,
              "ci_level": ci_level, "permutation_statistic": permutation_statistic, **variant.config()}
    return AnalysisResult(
        site=site, position=position, layers=layer_list, sources=names,
        cells=[cells[n, layer] for n in names for layer in layer_list], model=model,
        prompt_set=prompt_info, config=config, category_cosine=category_cosine, layer_cosine=layer_cosine,
        recommended_layers=recommended, recommendation=reason, top_layer=top_layer, hypotheses=hypotheses,
        projection=projection, directions=directions, warnings=warnings,
        elapsed_s=round(time.perf_counter() - start, 3),
        created=datetime.now(UTC).isoformat(timespec="seconds"), package_version=package_version())


def _check_options(method: str, permutation_statistic: str, n_permutations: int, n_bootstrap: int,
                   variant: Variant) -> None:
    check_variant(variant.name)
    if variant.benign_components < 1:
        raise UserError(f"benign_components must be at least 1 (got {variant.benign_components}).")
    if method not in ("mean", "median"):
        raise UserError(f"Unknown direction method '{method}'. Use 'mean' or 'median'.")
    if method == "median" and variant.name == "median":
        raise UserError("Method 'median' (the geometric median of each group) and the direction variant 'median' "
                        "(the difference of per-unit medians) are two different robust directions; use one of them.")
    if permutation_statistic not in ("in_sample", "heldout"):
        raise UserError(f"Unknown permutation statistic '{permutation_statistic}'. Use 'in_sample' or "
                        "'heldout'.")
    if n_permutations < 1 or n_bootstrap < 10:
        raise UserError("Use at least 1 permutation and 10 bootstrap resamples (defaults: 1000 and 2000).")


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


def _designs(prompts: Sequence[Prompt], rows_by_source: dict[str, np.ndarray]
             ) -> tuple[dict[str, stats.Design], list[str]]:
    """Each source's design, and warnings for the categories skipped for lack of prompts."""
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
    return designs, warnings


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


def _measure(store: ActivationStore, site: str, position: str, layers: list[int], sources: list[_Source], *,
             method: str, variant: Variant, pca_components: int, ci_level: float, heldout_test: bool,
             progress: bool) -> tuple[dict[tuple[str, int], CellStats], dict[tuple[str, int], Parts], int]:
    """Every source's statistics and direction parts at every layer, and the hidden size. One layer's
    activations are read at a time; for the mean difference their Gram matrix is computed once for all
    sources, a linear variant maps each source's rows (its own fit) and takes their Gram."""
    from tqdm.auto import tqdm

    cells: dict[tuple[str, int], CellStats] = {}
    parts: dict[tuple[str, int], Parts] = {}
    hidden = 0
    bar = tqdm(total=len(sources) * len(layers), desc="analyze", unit="cell", disable=not progress)
    used = np.unique(np.concatenate([src.rows for src in sources]))
    shared = variant.statistics == "mean_diff"
    for layer in layers:
        acts = store.get(site, layer, position).detach().float().cpu()
        hidden = int(acts.shape[-1])
        if shared:
            full_gram = np.zeros((acts.shape[0], acts.shape[0]))
            full_gram[np.ix_(used, used)] = stats.gram(acts[torch.as_tensor(used)])
        for src in sources:
            bar.set_postfix_str(f"{src.name} L{layer}", refresh=False)
            x = acts[torch.as_tensor(src.rows)]
            part = parts[src.name, layer] = _direction_parts(x, src.design, method, pca_components, variant)
            if shared:
                g = stats.centre_gram(full_gram[np.ix_(src.rows, src.rows)])
            else:
                g = stats.gram(variant.features(x, src.design.positive))
            norm = _mean_gap(x, src.design) if variant.name == "mean_diff" else float(part[0].double().norm())
            cells[src.name, layer] = _cell(src, layer, g, ci_level, heldout_test, norm)
            bar.update()
    bar.close()
    return cells, parts, hidden


def _mean_gap(x: torch.Tensor, design: stats.Design) -> float:
    xd = x.numpy().astype(np.float64)
    return float(np.linalg.norm(xd[design.positive].mean(0) - xd[~design.positive].mean(0)))


def _cell(src: _Source, layer: int, g: np.ndarray, level: float, heldout_test: bool, norm: float) -> CellStats:
    """All statistics of one source at one layer (``g``: its centred Gram; ``norm``: its direction's);
    refit bootstrap replicates are kept on ``src`` for the hypotheses."""
    design, pos = src.design, src.design.positive
    sep = stats.separability_from_gram(g, design, src.fold)
    perm = stats.permutation_test_from_gram(g, design, src.perms, src.fold if heldout_test else None)
    reps = stats.refit_g(g, pos, src.boot, src.fold)
    ci_low, ci_high = stats.interval(sep.heldout_g, reps, None, level, "centred")
    in_low, in_high = stats.interval(sep.in_sample_g, stats.refit_g(g, pos, src.boot), None, level, "centred")
    src.replicates[layer] = reps
    return CellStats(src.name, layer, design.n, design.n_positive, design.n_negative,
                     design.n_clusters if design.paired else 0, design.paired, sep.heldout_g, ci_low, ci_high,
                     sep.heldout_accuracy, sep.heldout_auroc, sep.in_sample_g, in_low, in_high,
                     sep.in_sample_accuracy, sep.in_sample_auroc, perm.p_value, norm)


def _direction_parts(x: torch.Tensor, design: stats.Design, method: str, k: int, variant: Variant) -> Parts:
    """(vector, positive centre, negative centre, PCA basis). The PCA basis is of the centred paired
    differences when pairs exist; unpaired, each positive row is paired with the negative centroid,
    i.e. the principal variation of the sensitive group around its own mean."""
    pos_t, neg_t = torch.as_tensor(design.positive), torch.as_tensor(~design.positive)
    vector, pos_centre, neg_centre = direction_from_groups(x[pos_t], x[neg_t], method, variant.name,
                                                           variant.benign_components)
    rows = x.numpy().astype(np.float64)
    if k <= 0:
        return vector, pos_centre, neg_centre, None
    if design.paired:
        pos_idx, neg_idx = design.pairs()
        diffs = rows[pos_idx] - rows[neg_idx]
    else:
        diffs = rows[design.positive] - neg_centre.numpy().astype(np.float64)
    return vector, pos_centre, neg_centre, stats.principal_axes(diffs, k)


def _correct_across_layers(cells: dict[tuple[str, int], CellStats], sources: list[_Source], layers: list[int],
                           alpha: float) -> None:
    """Holm and Benjamini-Hochberg p-values over each source's layers; ``significant``: Holm below ``alpha``."""
    for src in sources:
        p = [cells[src.name, layer].p_value for layer in layers]
        for layer, p_holm, p_fdr in zip(layers, stats.holm(p), stats.benjamini_hochberg(p), strict=True):
            cell = cells[src.name, layer]
            cell.p_holm, cell.p_fdr = float(p_holm), float(p_fdr)
            cell.significant = bool(p_holm < alpha)


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


def _direction_set(src: _Source, cells: dict[tuple[str, int], CellStats], parts: dict[tuple[str, int], Parts], *,
                   site: str, position: str, layers: list[int], method: str, variant: Variant,
                   model: dict[str, Any], prompt_info: dict[str, Any], recommended: list[int]) -> DirectionSet:
    """A source's directions at every layer, with what steering and export need to know of them."""
    return DirectionSet(
        site=site, position=position, source=src.name,
        vectors={layer: parts[src.name, layer][0] for layer in layers},
        positive_mean={layer: parts[src.name, layer][1] for layer in layers},
        negative_mean={layer: parts[src.name, layer][2] for layer in layers},
        pca={layer: basis for layer in layers if (basis := parts[src.name, layer][3]) is not None},
        method=method, variant=variant.name,
        model_id=model["model_id"], weights_hash=model["weights_hash"], hidden_size=model["hidden_size"],
        prompt_set_hash=prompt_info["hash"], n_positive=src.design.n_positive,
        n_negative=src.design.n_negative,
        extra=clean({"paired": src.design.paired, "prompt_set_name": prompt_info["name"],
                     "pca_basis": "centred paired differences" if src.design.paired
                     else "positive rows minus the negative centroid, centred",
                     "recommended_layers": recommended,
                     "heldout_g": {str(layer): cells[src.name, layer].heldout_g for layer in layers},
                     "analysis_schema_version": SCHEMA_VERSION,
                     **({"benign_components": variant.benign_components}
                        if variant.name == "benign_subspace" else {})}))

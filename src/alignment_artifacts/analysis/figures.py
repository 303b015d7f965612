"""Figures of an analysis, drawn from its JSON form so they can be re-made from results.json.

Uses matplotlib's object API on the Agg canvas (no pyplot): nothing global changes, nothing is
ever shown, and it works without a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..cache import atomic_write_bytes

POOLED = "pooled"
_HELDOUT, _INSAMPLE = "#1f6fb4", "#c2562b"
_GROUP_COLOURS = {0: "#4a8f5a", 1: "#b23a48"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(data: dict[str, Any], source: str, key: str) -> np.ndarray:
    rows = {r["layer"]: r for r in data["rows"] if r["category"] == source}
    return np.array([np.nan if rows.get(layer, {}).get(key) is None else rows[layer][key]
                     for layer in data["layers"]], dtype=float)


def _mark_recommended(ax: Axes, data: dict[str, Any]) -> None:
    for layer in data.get("recommended_layers") or []:
        ax.axvspan(layer - 0.5, layer + 0.5, color="#f2d479", alpha=0.35, lw=0, zorder=0)


def effect_size_figure(data: dict[str, Any]) -> Figure:
    """Held-out g (honest) and in-sample g (optimistic) with bootstrap CI bands, one panel per source."""
    sources = data["sources"]
    cols = min(3, len(sources))
    nrows = math.ceil(len(sources) / cols)
    fig = _figure(4.6 * cols, 3.2 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, sharey=True, squeeze=False)).ravel()
    layers = np.array(data["layers"])
    for ax, source in zip(axes, sources):
        _mark_recommended(ax, data)
        for key, low, high, colour, name in (
                ("in_sample_g", "in_sample_ci_low", "in_sample_ci_high", _INSAMPLE,
                 "in-sample g (optimistic)"),
                ("heldout_g", "ci_low", "ci_high", _HELDOUT, "held-out g")):
            ax.fill_between(layers, _series(data, source, low), _series(data, source, high), color=colour,
                            alpha=0.18, lw=0)
            ax.plot(layers, _series(data, source, key), color=colour, lw=1.8, marker="o", ms=3, label=name,
                    ls="--" if key.startswith("in_sample") else "-")
        significant = np.array([bool(v) if v == v else False for v in _series(data, source, "significant")])
        if significant.any():
            ax.plot(layers[significant], _series(data, source, "heldout_g")[significant], ls="none",
                    marker="*", ms=8, color="black", label="significant (Holm)")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(source, fontsize=11)
        ax.grid(alpha=0.3)
    for ax in axes[len(sources):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes[:len(sources)]):
        ax.set_xlabel("layer")
        if i % cols == 0:
            ax.set_ylabel("Hedges' g")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Artifact effect size by layer ({data['config']['site']}, {data['config']['position']}); "
                 "bands: 95% bootstrap CI, shading: recommended layers", fontsize=11)
    return fig


def heatmap_figure(data: dict[str, Any]) -> Figure:
    """Source x layer heatmap of held-out g."""
    sources, layers = data["sources"], data["layers"]
    grid = np.array([_series(data, s, "heldout_g") for s in sources])
    fig = _figure(max(6.0, 0.42 * len(layers) + 2.5), 0.55 * len(sources) + 1.8)
    ax = fig.subplots()
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("layer")
    if len(layers) <= 32:
        for i in range(len(sources)):
            for j in range(len(layers)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(grid[i, j]) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, label="held-out Hedges' g")
    ax.set_title("Held-out effect size by category and layer")
    return fig


def _matrix_heatmap(matrix: np.ndarray, labels: list[str], title: str, colour_label: str,
                    axis_label: str = "") -> Figure:
    size = max(4.5, 0.6 * len(labels) + 2.5) if len(labels) <= 12 else max(6.0, 0.25 * len(labels) + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    ax.set_xticks(range(len(labels)), labels, rotation=0 if numeric else 45, ha="center" if numeric else "right",
                  fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if axis_label:
        ax.set_xlabel(axis_label)
        ax.set_ylabel(axis_label)
    if len(labels) <= 12:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(matrix[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label=colour_label, shrink=0.85)
    ax.set_title(title, fontsize=11)
    return fig


def category_cosine_figure(data: dict[str, Any]) -> Figure | None:
    """Cosine between category directions at the top recommended layer."""
    layer = data.get("top_layer")
    entry = data["cosine"]["categories"].get(str(layer))
    if layer is None or not entry or len(entry["labels"]) < 2:
        return None
    matrix = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]], dtype=float)
    return _matrix_heatmap(matrix, entry["labels"], f"Cosine between category directions, layer {layer}",
                           "cosine similarity")


def layer_cosine_figure(data: dict[str, Any], source: str = POOLED) -> Figure | None:
    """Cosine between one source's directions at different layers (how stable the direction is)."""
    entry = data["cosine"]["layers"].get(source)
    if not entry or len(entry["layers"]) < 2:
        return None
    matrix = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]], dtype=float)
    return _matrix_heatmap(matrix, [str(v) for v in entry["layers"]],
                           f"Cosine between layers' directions ({source})", "cosine similarity", "layer")


def projection_figure(data: dict[str, Any]) -> Figure | None:
    """Prompts on the direction (x) and the main orthogonal variation (y), coloured by group."""
    proj = data.get("projection") or {}
    if not proj.get("x"):
        return None
    x, y, label = np.array(proj["x"], float), np.array(proj["y"], float), np.array(proj["label"], int)
    paired = bool(data["prompt_set"].get("paired"))
    names = {1: "artifact" if paired else "harmful", 0: "natural" if paired else "harmless"}
    fig = _figure(6.4, 4.8)
    ax = fig.subplots()
    for value in (0, 1):
        keep = label == value
        ax.scatter(x[keep], y[keep], s=16, alpha=0.7, color=_GROUP_COLOURS[value],
                   label=f"{names[value]} (n={int(keep.sum())})", edgecolors="none")
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("projection on the artifact direction (in-sample)")
    ax.set_ylabel("first PC orthogonal to the direction")
    ax.set_title(f"Prompts at layer {proj['layer']} ({proj['source']})")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fig


FIGURES = {
    "effect_size": effect_size_figure,
    "heatmap_g": heatmap_figure,
    "category_cosine": category_cosine_figure,
    "layer_cosine": layer_cosine_figure,
    "projection": projection_figure,
}


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """name -> PNG bytes for every figure the data supports."""
    out = {}
    for name, make in FIGURES.items():
        fig = make(data)
        if fig is not None:
            out[name] = png_bytes(fig)
    return out


def save_figures(data: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write every figure as ``<folder>/<name>.png`` (atomically) and return the paths."""
    folder = Path(folder)
    paths = []
    for name, blob in render_figures(data).items():
        path = folder / f"{name}.png"
        atomic_write_bytes(path, blob)
        paths.append(path)
    return paths

"""Directions as a value type: per-layer vectors plus the identity of what they came from.

A direction is the raw difference of group means (sensitive minus ordinary) at one site and
token position, or one of the ``VARIANTS`` of it (docs/steering-modes.md, "Direction variants").
The raw vector keeps its norm (steering by ``h - s*v`` needs it); ``unit()``
gives the normalised one (ablation needs that). The group means travel with it, because
``sphere`` steering pushes away from the sensitive centroid, and so does an optional PCA basis
of paired differences for ``subspace`` steering.

Saved as ``directions.safetensors`` + ``directions.json``; loading checks the model it is
applied to (hidden size, weights hash) so a direction is never silently used on another model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from ..cache import atomic_directory, atomic_save_safetensors, atomic_write_json, stable_hash, tensors_sha256
from ..errors import CacheError, UserError, closest

if TYPE_CHECKING:
    import numpy as np

FORMAT_VERSION = 1
VARIANTS = {
    "mean_diff": "the difference of the group means (the default)",
    "harmless_projected": "the mean difference with its component along the ordinary (harmless) mean removed",
    "benign_subspace": "the mean difference with the top-k principal axes of the ordinary activations removed",
    "standardized": "the per-dimension t-statistic: mean difference over the pooled per-dimension std",
    "median": "the difference of the per-dimension medians",
}


@dataclass
class DirectionSet:
    site: str
    position: str
    source: str  # "pooled" or a category name
    vectors: dict[int, torch.Tensor]  # layer -> raw mean difference, float32 [hidden]
    positive_mean: dict[int, torch.Tensor]
    negative_mean: dict[int, torch.Tensor]
    pca: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [k, hidden] orthonormal rows
    method: str = "mean"  # "mean" or "median" (geometric median of each group)
    variant: str = "mean_diff"  # one of VARIANTS
    model_id: str = ""
    weights_hash: str = ""
    hidden_size: int = 0
    prompt_set_hash: str = ""
    n_positive: int = 0
    n_negative: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def unit(self, layer: int) -> torch.Tensor:
        v = self.vectors[layer]
        return v / v.norm().clamp_min(1e-12)

    def norm(self, layer: int) -> float:
        return float(self.vectors[layer].norm())

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "site": self.site, "position": self.position,
            "source": self.source, "method": self.method, "variant": self.variant, "model_id": self.model_id,
            "weights_hash": self.weights_hash, "hidden_size": self.hidden_size,
            "prompt_set_hash": self.prompt_set_hash, "n_positive": self.n_positive,
            "n_negative": self.n_negative, "layers": self.layers,
            "norms": {str(layer): self.norm(layer) for layer in self.layers},
            "pca_components": int(next(iter(self.pca.values())).shape[0]) if self.pca else 0,
            "extra": self.extra,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            out[f"vector.{layer}"] = self.vectors[layer].float()
            out[f"positive_mean.{layer}"] = self.positive_mean[layer].float()
            out[f"negative_mean.{layer}"] = self.negative_mean[layer].float()
            if layer in self.pca:
                out[f"pca.{layer}"] = self.pca[layer].float()
        return out

    def digest(self) -> str:
        """What identifies these directions' numbers: every tensor and the metadata (a cached
        measurement of a steering that uses them is keyed by it)."""
        return stable_hash({"tensors": tensors_sha256(self.tensors()), "metadata": self.metadata()})

    def save(self, folder: str | Path, overwrite: bool = True) -> Path:
        folder = Path(folder)
        with atomic_directory(folder, overwrite=overwrite) as tmp:
            atomic_save_safetensors(self.tensors(), tmp / "directions.safetensors")
            atomic_write_json(tmp / "directions.json", self.metadata())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DirectionSet:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, tensor_path = folder / "directions.json", folder / "directions.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise UserError(f"{folder} does not hold a saved direction set (expected directions.json and "
                            "directions.safetensors). Create one with `alignment-artifacts analyze` or "
                            "`alignment-artifacts export --format vectors`.")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except (json.JSONDecodeError, SafetensorError) as exc:
            raise CacheError(f"The direction set in {folder} is corrupt ({exc}). Delete {folder} and run the "
                             "command again to recompute it.") from exc

        def by_prefix(prefix: str) -> dict[int, torch.Tensor]:
            return {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith(prefix + ".")}

        return cls(site=meta["site"], position=meta["position"], source=meta["source"],
                   vectors=by_prefix("vector"), positive_mean=by_prefix("positive_mean"),
                   negative_mean=by_prefix("negative_mean"), pca=by_prefix("pca"),
                   method=meta.get("method", "mean"), variant=meta.get("variant", "mean_diff"),
                   model_id=meta.get("model_id", ""),
                   weights_hash=meta.get("weights_hash", ""), hidden_size=int(meta.get("hidden_size", 0)),
                   prompt_set_hash=meta.get("prompt_set_hash", ""), n_positive=int(meta.get("n_positive", 0)),
                   n_negative=int(meta.get("n_negative", 0)), extra=meta.get("extra", {}))

    def check_compatible(self, hidden_size: int, weights_hash: str | None = None, model_id: str = "") -> None:
        """Refuse directions computed for another model instead of silently applying them."""
        if self.hidden_size and hidden_size != self.hidden_size:
            raise UserError(f"These directions were computed for a model with hidden size {self.hidden_size} "
                            f"({self.model_id or 'unknown model'}), but {model_id or 'this model'} has hidden "
                            f"size {hidden_size}. Recompute them for this model with `alignment-artifacts "
                            "analyze --model ...`.")
        if weights_hash and self.weights_hash and weights_hash != self.weights_hash:
            raise UserError(f"These directions were computed for weights {self.weights_hash} "
                            f"({self.model_id or 'unknown model'}), but {model_id or 'this model'} has weights "
                            f"{weights_hash}. Directions do not transfer between models; recompute them with "
                            "`alignment-artifacts analyze --model ...`.")


def geometric_median(points: torch.Tensor, iterations: int = 64, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: a mean that a few outlying prompts cannot drag around."""
    median = points.mean(0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=1).clamp_min(eps)
        weights = 1.0 / dist
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() < eps * (1 + median.norm()):
            return updated
        median = updated
    return median


def paired_pca(positive: torch.Tensor, negative: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k orthonormal directions of the paired differences (rows), centred."""
    from .stats import principal_axes

    return principal_axes((positive - negative).double(), k)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"Unknown direction variant '{variant}'.{closest(variant, list(VARIANTS))} Variants: "
                        f"{', '.join(VARIANTS)}.")


def direction_from_groups(positive: torch.Tensor, negative: torch.Tensor, method: str = "mean",
                          variant: str = "mean_diff", benign_components: int = 3
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw direction, positive centre, negative centre) from two [n, hidden] groups.

    A variant only chooses the direction u; the raw vector is always the centre difference's
    component along it, ``(d.u)u``, so additive modes move activations by how far the groups'
    centres actually differ along u (for ``mean_diff`` that is d itself).
    """
    check_variant(variant)
    positive, negative = positive.double(), negative.double()
    if method == "mean":
        pos, neg = positive.mean(0), negative.mean(0)
    elif method == "median":
        pos, neg = geometric_median(positive), geometric_median(negative)
    else:
        raise UserError(f"Unknown direction method '{method}'. Use 'mean' or 'median'.")
    diff = pos - neg
    if variant != "mean_diff":
        axis = _variant_axis(positive, negative, diff, neg, variant, benign_components)
        unit = axis / axis.norm().clamp_min(1e-12)
        diff = (diff @ unit) * unit
    return diff.float(), pos.float(), neg.float()


def _variant_axis(positive: torch.Tensor, negative: torch.Tensor, diff: torch.Tensor, neg: torch.Tensor,
                  variant: str, k: int) -> torch.Tensor:
    """The direction of a variant (any length), from float64 groups, centre difference and ordinary centre."""
    if variant == "harmless_projected":  # what the ordinary centre already points along is not the artifact
        m = _ordinary_axis(neg)
        return diff - (diff @ m) * m
    if variant == "benign_subspace":  # nor is the ordinary activations' main variation
        basis = _benign_basis(negative, k)
        return diff - basis.T @ (basis @ diff)
    if variant == "standardized":  # dimensions that vary a lot within groups count less
        return diff / _pooled_std(positive, negative)
    return torch.quantile(positive, 0.5, dim=0) - torch.quantile(negative, 0.5, dim=0)  # median: robust per unit


def _ordinary_axis(neg: torch.Tensor) -> torch.Tensor:
    return neg / neg.norm().clamp_min(1e-12)


def _benign_basis(negative: torch.Tensor, k: int) -> torch.Tensor:
    from .stats import principal_axes

    return principal_axes(negative, k).double()


def _pooled_std(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per-dimension within-group std, floored so a constant unit cannot divide by zero."""
    dof = len(positive) + len(negative) - 2
    if dof < 1:
        raise UserError("The 'standardized' direction needs at least 3 prompts (a per-dimension spread).")
    squares = ((positive - positive.mean(0)) ** 2).sum(0) + ((negative - negative.mean(0)) ** 2).sum(0)
    std = (squares / dof).sqrt()
    return std.clamp_min(1e-6 * float(std.max()) + 1e-12)


def variant_features(rows: torch.Tensor, positive: torch.Tensor, variant: str, benign_components: int = 3
                     ) -> torch.Tensor | None:
    """``rows`` (float64) mapped so that their plain mean difference points along ``variant``'s direction.

    Projections onto that mean difference are then projections onto the variant's direction (up to
    one positive factor), so ``analyze`` measures a variant with its mean-difference statistics
    unchanged, refits in folds, resamples and permutations included; the map itself is fitted once,
    on all ``rows`` (``positive``: their labels as a bool mask). The three variants are linear maps
    A with direction A²d: projections (harmless_projected, benign_subspace) and a per-unit scaling by
    1/sqrt(std) (standardized). None for mean_diff (no map needed) and median (no linear map).
    """
    check_variant(variant)
    if variant in ("mean_diff", "median"):
        return None
    x = rows.double()
    if variant == "standardized":
        return x / _pooled_std(x[positive], x[~positive]).sqrt()
    negative = x[~positive]
    basis = (_ordinary_axis(negative.mean(0))[None] if variant == "harmless_projected"
             else _benign_basis(negative, benign_components))
    return x - (x @ basis.T) @ basis


@dataclass(frozen=True)
class Variant:
    """The direction variant ``analyze`` measures, and which direction its statistics are of."""

    name: str = "mean_diff"
    benign_components: int = 3

    @property
    def statistics(self) -> str:
        return "mean_diff" if self.name == "median" else self.name

    def features(self, rows: torch.Tensor, positive: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The rows whose plain mean difference the statistics measure (``positive``: a bool mask)."""
        mapped = variant_features(rows, torch.as_tensor(positive), self.name, self.benign_components)
        return rows if mapped is None else mapped

    def config(self) -> dict[str, Any]:
        return {"direction_variant": self.name, "statistics_variant": self.statistics,
                **({"benign_components": self.benign_components} if self.name == "benign_subspace" else {})}


def compute_directions(store: Any, site: str, position: str, categories: list[str] | None = None,
                       method: str = "mean", pca_components: int = 5, source: str | None = None,
                       variant: str = "mean_diff", benign_components: int = 3) -> DirectionSet:
    """Directions (difference of means, or a ``variant``) at every stored layer, from all prompts or chosen
    categories."""
    check_variant(variant)
    prompts = store.prompts
    keep = [i for i, p in enumerate(prompts) if categories is None or p.category in categories]
    if categories is not None:
        known = sorted({p.category for p in prompts if p.category})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise UserError(f"Unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}. This prompt set has: "
                            f"{', '.join(known) or 'no categories'}.")
    labels = torch.tensor([prompts[i].label for i in keep])
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise UserError("Directions need prompts of both groups (sensitive and ordinary); the selection has one.")
    index = torch.tensor(keep)
    pos_rows, neg_rows = index[labels == 1], index[labels == 0]
    paired = all(prompts[i].pair_id is not None for i in keep)
    vectors, pos_means, neg_means, pca = {}, {}, {}, {}
    for layer in store.layers:
        acts = store.get(site, layer, position)
        if acts.dim() != 2:
            raise UserError(f"Position '{position}' stores several vectors per prompt; pick a single-vector "
                            "position (last, mean, first_generated, post_think) for directions.")
        positive, negative = acts[pos_rows], acts[neg_rows]
        vectors[layer], pos_means[layer], neg_means[layer] = direction_from_groups(
            positive, negative, method, variant, benign_components)
        if pca_components > 0:
            if paired and len(positive) == len(negative):
                pca[layer] = paired_pca(positive, negative, pca_components)
            else:  # unpaired: differences of each sensitive prompt from the ordinary mean
                pca[layer] = paired_pca(positive, negative.mean(0, keepdim=True).expand_as(positive),
                                        pca_components)
    manifest = store.manifest
    return DirectionSet(site=site, position=position, source=source or (",".join(categories) if categories
                                                                       else "pooled"),
                        vectors=vectors, positive_mean=pos_means, negative_mean=neg_means, pca=pca, method=method,
                        variant=variant,
                        model_id=manifest.get("model_id", ""), weights_hash=manifest.get("weights_hash", ""),
                        hidden_size=int(manifest.get("hidden_size", 0) or next(iter(vectors.values())).numel()),
                        prompt_set_hash=manifest.get("prompt_set_hash", ""), n_positive=len(pos_rows),
                        n_negative=len(neg_rows),
                        extra={"prompt_set_name": manifest.get("prompt_set_name", ""), "categories": categories,
                               **({"benign_components": benign_components} if variant == "benign_subspace" else {})})

"""Honest statistics for a contrast direction: effect sizes, intervals, held-out separability, tests.

Everything works on one *cell*: the activations of one category (or all prompts) at one layer,
with a binary label per row and optional clusters (matched pairs). The direction is always the
difference of group means, and every statistic accounts for that direction having been fitted:

* The headline effect size is *cross-fitted*: the direction comes from the training folds only
  and the held-out rows are projected onto it. The in-sample g (direction fitted and evaluated on
  the same rows) is biased upward, badly so when hidden size >> prompts: on pure noise it grows
  like ``sqrt(hidden / n)``. It is still reported, but always labelled ``in_sample_*``.
* The permutation test refits the direction on every permutation, so the null distribution has
  the same fitting optimism as the observed in-sample statistic.
* Matched pairs are the resampling unit (bootstrap, folds, permutations), because the two
  prompts of a pair share their topic and are not independent observations.

A mean-difference direction is a linear combination of rows, so every projection only needs the
centred Gram matrix ``X Xᵀ`` (n x n): refitting for 1000 permutations or 5 folds is a matmul in
prompt space whose cost does not depend on the hidden size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import torch

Folds = int | Literal["loo"]
_NORMAL = NormalDist()


# --------------------------------------------------------------------------- linear algebra


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 matmul through torch, whose thread count ``threads`` can cap at run time."""
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


@contextlib.contextmanager
def threads(n: int = 1) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (torch's BLAS/LAPACK included).

    Every problem here is small (n x n with n in the hundreds), where threading gains little; on a
    busy machine, two threads spinning for two shared cores made an eigendecomposition 400x and a
    matmul 2x slower than one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, previous)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Design:
    """Labels and resampling clusters of one cell's rows.

    ``cluster[i]`` is the resampling unit of row ``i``: its pair, or the row itself when it has
    no pair. ``paired`` means every cluster is exactly one positive and one negative row.
    """

    positive: np.ndarray  # bool [n]
    cluster: np.ndarray  # int [n], values 0..n_clusters-1

    @classmethod
    def build(cls, labels: Sequence[int] | np.ndarray, groups: Sequence[Hashable | None] | None = None
              ) -> Design:
        positive = np.asarray(labels).astype(bool)
        if groups is None:
            groups = [None] * len(positive)
        if len(groups) != len(positive):
            raise ValueError("groups and labels must have the same length")
        ids: dict[Hashable, int] = {}
        cluster = np.empty(len(positive), dtype=np.int64)
        for i, group in enumerate(groups):
            key = ("__row__", i) if group is None else ("__group__", group)
            cluster[i] = ids.setdefault(key, len(ids))
        return cls(positive, cluster)

    @property
    def n(self) -> int:
        return int(self.positive.size)

    @property
    def n_positive(self) -> int:
        return int(self.positive.sum())

    @property
    def n_negative(self) -> int:
        return self.n - self.n_positive

    @property
    def n_clusters(self) -> int:
        return int(self.cluster.max()) + 1 if self.n else 0

    def composition(self) -> np.ndarray:
        """[n_clusters, 2]: (negatives, positives) in each cluster."""
        out = np.zeros((self.n_clusters, 2), dtype=np.int64)
        np.add.at(out, (self.cluster, self.positive.astype(np.int64)), 1)
        return out

    @property
    def paired(self) -> bool:
        return self.n > 0 and bool((self.composition() == 1).all())

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(positive rows, negative rows) aligned by pair; only for paired designs."""
        if not self.paired:
            raise ValueError("design is not paired")
        order = np.argsort(self.cluster, kind="stable")
        pos = order[self.positive[order]]
        neg = order[~self.positive[order]]
        return pos, neg

    def strata(self) -> list[np.ndarray]:
        """Clusters grouped by composition, so resampling keeps group sizes fixed."""
        comp = self.composition()
        keys = comp[:, 0] * (self.n + 1) + comp[:, 1]
        return [np.flatnonzero(keys == key) for key in np.unique(keys)]


def _rng(seed: int | np.random.Generator | Sequence[int]) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------- effect size


def hedges_j(df: float | np.ndarray) -> np.ndarray:
    """Exact small-sample correction J(df) = Γ(df/2) / (sqrt(df/2) Γ((df-1)/2))."""
    df = np.asarray(df, dtype=np.float64)
    safe = np.where(df > 1, df, 2.0)
    unique, inverse = np.unique(safe, return_inverse=True)
    log_j = np.array([math.lgamma(v / 2) - 0.5 * math.log(v / 2) - math.lgamma((v - 1) / 2) for v in unique])
    return np.where(df > 1, np.exp(log_j)[inverse.reshape(safe.shape)], np.nan)


def _g_from_moments(n1: np.ndarray, s1: np.ndarray, q1: np.ndarray, n0: np.ndarray, s0: np.ndarray,
                    q0: np.ndarray) -> np.ndarray:
    """Hedges' g from per-group counts, sums and sums of squares (broadcasting)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m0 = s1 / n1, s0 / n0
        ss1 = np.maximum(q1 - n1 * m1 ** 2, 0.0)
        ss0 = np.maximum(q0 - n0 * m0 ** 2, 0.0)
        df = n1 + n0 - 2
        sd = np.sqrt((ss1 + ss0) / df)
        g = (m1 - m0) / sd * hedges_j(df)
    return np.where(sd > 1e-12 * (np.abs(m1) + np.abs(m0) + 1e-300), g, np.nan)


def hedges_g(x1: Sequence[float] | np.ndarray, x0: Sequence[float] | np.ndarray) -> float:
    """Cohen's d with the pooled SD, times Hedges' J; positive when ``x1`` is larger."""
    a, b = np.asarray(x1, dtype=np.float64).ravel(), np.asarray(x0, dtype=np.float64).ravel()
    centre = np.concatenate([a, b]).mean() if a.size + b.size else 0.0
    a, b = a - centre, b - centre
    return float(_g_from_moments(np.array(a.size, dtype=np.float64), np.array(a.sum()), np.array((a * a).sum()),
                                 np.array(b.size, dtype=np.float64), np.array(b.sum()), np.array((b * b).sum())))


def weighted_g(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """g of ``scores`` ([n] or [L, n]) under each row of case weights ``weights`` [B, n] -> [B] or [B, L].

    Bootstrap resamples and jackknife deletions are both just integer case weights, so one matmul
    evaluates every replicate for every layer at once.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    s = s - s.mean(axis=1, keepdims=True)
    w1 = weights * positive
    w0 = weights * ~positive
    n1, n0 = w1.sum(1, keepdims=True), w0.sum(1, keepdims=True)
    g = _g_from_moments(n1, matmul(w1, s.T), matmul(w1, (s * s).T), n0, matmul(w0, s.T), matmul(w0, (s * s).T))
    return g[:, 0] if np.ndim(scores) == 1 else g


# --------------------------------------------------------------------------- bootstrap


def resample_weights(design: Design, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """[n_boot, n] case weights of a cluster bootstrap, stratified by cluster composition.

    Paired data: pairs are drawn with replacement (both prompts of a pair travel together).
    Unpaired data: positives and negatives are resampled separately, so group sizes stay fixed.
    """
    rng = _rng(seed)
    counts = np.zeros((n_boot, design.n_clusters))
    for members in design.strata():
        draws = rng.integers(0, members.size, size=(n_boot, members.size))
        flat = (draws + np.arange(n_boot)[:, None] * members.size).ravel()
        counts[:, members] = np.bincount(flat, minlength=n_boot * members.size).reshape(n_boot, -1)
    return counts[:, design.cluster]


def jackknife_weights(design: Design) -> np.ndarray:
    """[n_clusters, n] case weights that each leave one cluster out (for the BCa acceleration)."""
    return (design.cluster[None, :] != np.arange(design.n_clusters)[:, None]).astype(np.float64)


IntervalMethod = Literal["bca", "percentile", "centred"]


def interval(estimate: float, replicates: np.ndarray, jackknife: np.ndarray | None = None,
             level: float = 0.95, method: IntervalMethod = "bca") -> tuple[float, float]:
    """Bootstrap interval of ``estimate`` from its ``replicates``.

    ``"bca"``: bias-corrected and accelerated (acceleration from ``jackknife`` values; without
    them only the bias correction). ``"percentile"``: plain percentiles. ``"centred"``: the
    replicates' percentiles moved so their median sits on the estimate. Use "centred" when the
    replicates are shifted for a known, irrelevant reason: a direction refitted on a resample (only
    ~63% distinct pairs) is noisier than the one fitted on all data, so held-out replicates sit
    below the estimate and in-sample ones above it, often by more than their spread, which breaks
    BCa's bias correction. Their spread still carries the direction's estimation noise, which is
    the part worth keeping; simulations in the tests check the resulting coverage.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size < 10 or not np.isfinite(estimate):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    quantiles = np.array([alpha, 1 - alpha])
    if method == "centred":
        low, high = np.quantile(reps, quantiles) - np.median(reps) + estimate
        return float(low), float(high)
    prop = float(np.mean(reps < estimate) + 0.5 * np.mean(reps == estimate))
    if method == "bca" and 0 < prop < 1:
        z0 = _NORMAL.inv_cdf(prop)
        a = 0.0
        if jackknife is not None:
            jack = np.asarray(jackknife, dtype=np.float64)
            dev = jack[np.isfinite(jack)].mean() - jack[np.isfinite(jack)]
            den = 6 * float((dev ** 2).sum()) ** 1.5
            a = float((dev ** 3).sum()) / den if den > 0 else 0.0
        z = np.array([_NORMAL.inv_cdf(float(q)) for q in quantiles])
        adjusted = z0 + (z0 + z) / (1 - a * (z0 + z))
        quantiles = np.array([_NORMAL.cdf(float(v)) for v in adjusted])
    low, high = np.quantile(reps, np.clip(quantiles, 0, 1))
    return float(low), float(high)


def bootstrap_ci(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                 groups: Sequence[Hashable | None] | None = None, *, n_boot: int = 2000,
                 level: float = 0.95, seed: int | np.random.Generator = 0,
                 method: Literal["bca", "percentile"] = "bca") -> tuple[float, float]:
    """Bootstrap CI of Hedges' g between the label-1 and label-0 ``scores``.

    Pass pair ids as ``groups`` to resample pairs together; without them each group is resampled
    separately. This resamples fixed scores; for the held-out g of a fitted direction use
    ``heldout_bootstrap_ci``, which refits the direction in every resample.
    """
    design = Design.build(labels, groups)
    values = np.asarray(scores, dtype=np.float64)
    estimate = hedges_g(values[design.positive], values[~design.positive])
    reps = weighted_g(values, design.positive, resample_weights(design, n_boot, seed))
    jack = weighted_g(values, design.positive, jackknife_weights(design)) if method == "bca" else None
    return interval(estimate, reps, jack, level, method)


# --------------------------------------------------------------------------- held-out separability


def _float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64) if isinstance(x, torch.Tensor) else np.asarray(
        x, dtype=np.float64)


def gram(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Centred Gram matrix (x - mean) (x - mean)ᵀ in float64: all a mean-difference direction needs."""
    t = _float64(x)
    t = t - t.mean(0, keepdims=True)
    return matmul(t, t.T)


def centre_gram(k: np.ndarray) -> np.ndarray:
    """Double-centre a Gram block, so one Gram of all prompts serves every subset of them."""
    return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


def principal_axes(rows: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
    """Top-k orthonormal principal axes [k, hidden] (float32) of the centred ``rows``.

    Same result as an SVD of the rows (up to each axis' sign) but through the n x n Gram matrix,
    which is far cheaper when prompts are much fewer than hidden units.
    """
    d = _float64(rows)
    d = d - d.mean(0, keepdims=True)
    n, hidden = d.shape
    k = max(1, min(k, n - 1 if n > 1 else 1, hidden))
    t = torch.from_numpy(d)
    values, vectors = torch.linalg.eigh(t @ t.T)
    top = torch.argsort(values, descending=True)[:k]
    scale = values[top].clamp_min(0).sqrt()
    if hidden <= n or not bool((scale > 1e-9 * scale[0].clamp_min(1e-300)).all()):
        return torch.linalg.svd(t, full_matrices=False)[2][:k].float()
    return ((vectors[:, top].T @ t) / scale[:, None]).float()


def assign_folds(design: Design, folds: Folds = 5, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Fold index per row: whole clusters (pairs) per fold, dealt round-robin within each
    composition stratum so every fold gets a similar label balance. ``"loo"``: one cluster per fold."""
    rng = _rng(seed)
    if folds == "loo":
        return design.cluster.copy()
    if not isinstance(folds, int) or folds < 2:
        raise ValueError("folds must be an integer >= 2 or 'loo'")
    k = min(folds, design.n_clusters)
    fold_of_cluster = np.empty(design.n_clusters, dtype=np.int64)
    offset = 0
    for members in design.strata():
        shuffled = rng.permutation(members)
        fold_of_cluster[shuffled] = (offset + np.arange(shuffled.size)) % k
        offset += shuffled.size
    return fold_of_cluster[design.cluster]


def _projections(g: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray) -> np.ndarray:
    """Rows [F, n]: every row projected on the unit mean-difference direction of each training mask,
    minus the midpoint of that training set's two projected group means."""
    coef = train_pos / train_pos.sum(1, keepdims=True) - train_neg / train_neg.sum(1, keepdims=True)
    gc = matmul(coef, g)
    norm = np.sqrt(np.maximum((gc * coef).sum(1, keepdims=True), 0.0))
    proj = np.divide(gc, norm, out=np.zeros_like(gc), where=norm > 1e-12)
    mid = 0.5 * ((proj * train_pos).sum(1, keepdims=True) / train_pos.sum(1, keepdims=True)
                 + (proj * train_neg).sum(1, keepdims=True) / train_neg.sum(1, keepdims=True))
    return proj - mid


def crossfit_scores(g: np.ndarray, design: Design, fold: np.ndarray) -> np.ndarray:
    """Held-out score per row: projection on the direction fitted without that row's fold, minus
    that fold's training threshold. Positive means 'looks like the sensitive group'."""
    ids = np.unique(fold)
    train = fold[None, :] != ids[:, None]
    proj = _projections(g, train & design.positive, train & ~design.positive)
    return proj[np.searchsorted(ids, fold), np.arange(design.n)]


def insample_scores(g: np.ndarray, design: Design) -> np.ndarray:
    """Projection on the direction fitted on all rows, minus its midpoint threshold (optimistic)."""
    return _projections(g, design.positive[None, :], ~design.positive[None, :])[0]


def _rowwise_g(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """g of each row of ``scores`` [B, n] under the matching rows of labels and case weights."""
    s = scores - scores.mean(1, keepdims=True)
    w1, w0 = weights * positive, weights * ~positive
    return _g_from_moments(w1.sum(1), (w1 * s).sum(1), (w1 * s * s).sum(1),
                           w0.sum(1), (w0 * s).sum(1), (w0 * s * s).sum(1))


def refit_g(g: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None,
            fold: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """g with the direction refitted for each row of labels ``positive`` and case ``weights``.

    ``positive`` is [n] or [B, n] (permutations), ``weights`` [B, n] (bootstrap or jackknife case
    weights) or None. Without ``fold`` the g is in-sample; with ``fold`` it is cross-fitted: each
    fold's direction is fitted on the weighted training rows and scored on its held-out rows. Folds
    stay those of the original clusters, so copies of a resampled pair never straddle a split.
    Refitting in every replicate is what lets intervals and tests include the direction's own
    estimation noise, which resampling fixed projections would miss.
    """
    positive = np.atleast_2d(positive).astype(bool)
    n = positive.shape[1]
    weights = np.ones((positive.shape[0], n)) if weights is None else np.atleast_2d(weights)
    size = max(positive.shape[0], weights.shape[0])
    if fold is None:
        fold = np.zeros(n, dtype=np.int64)
        train = np.ones((1, n), dtype=bool)
    else:
        train = fold[None, :] != np.unique(fold)[:, None]
    own = np.searchsorted(np.unique(fold), fold)
    chunk = max(1, min(chunk, 4_000_000 // (train.shape[0] * n)))  # bounds memory for leave-one-out
    out = np.empty(size)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, size, chunk):
            stop = min(start + chunk, size)
            lab = positive[start:stop] if positive.shape[0] > 1 else positive
            w = weights[start:stop] if weights.shape[0] > 1 else weights
            wp, wn = (w * lab)[:, None, :] * train, (w * ~lab)[:, None, :] * train
            n1, n0 = wp.sum(-1, keepdims=True), wn.sum(-1, keepdims=True)
            coef = wp / n1 - wn / n0
            gc = matmul(coef, g)
            norm = np.sqrt(np.maximum((gc * coef).sum(-1, keepdims=True), 0.0))
            proj = gc / norm
            mid = 0.5 * ((proj * wp).sum(-1, keepdims=True) / n1 + (proj * wn).sum(-1, keepdims=True) / n0)
            scores = (proj - mid)[:, own, np.arange(n)]
            out[start:stop] = _rowwise_g(np.nan_to_num(scores), lab, np.broadcast_to(w, scores.shape))
    return out


def heldout_bootstrap_ci(x: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray,
                         groups: Sequence[Hashable | None] | None = None, *, folds: Folds = 5,
                         n_boot: int = 2000, level: float = 0.95, seed: int | np.random.Generator = 0
                         ) -> tuple[float, float, float]:
    """(held-out g, low, high): pair bootstrap that refits and cross-fits the direction in every
    resample, interval centred on the estimate (see ``interval``)."""
    rng = _rng(seed)
    design = Design.build(labels, groups)
    g = gram(x)
    fold = assign_folds(design, folds, rng)
    estimate = separability_from_gram(g, design, fold).heldout_g
    reps = refit_g(g, design.positive, resample_weights(design, n_boot, rng), fold)
    return (estimate, *interval(estimate, reps, None, level, "centred"))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC: P(score of a positive > score of a negative), ties counting one half."""
    positive = np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def accuracy(scores: np.ndarray, positive: np.ndarray) -> float:
    """Share of rows on the right side of the threshold (score 0); a score of exactly 0 counts half."""
    scores = np.asarray(scores)
    correct = np.where(positive, scores > 0, scores < 0) + 0.5 * (scores == 0)
    return float(correct.mean())


@dataclass(frozen=True)
class Separability:
    """How well one direction separates the groups, held out (honest) and in sample (optimistic)."""

    heldout_g: float
    heldout_accuracy: float
    heldout_auroc: float
    in_sample_g: float
    in_sample_accuracy: float
    in_sample_auroc: float
    heldout_scores: np.ndarray
    in_sample_scores: np.ndarray


def separability_from_gram(g: np.ndarray, design: Design, fold: np.ndarray) -> Separability:
    held = crossfit_scores(g, design, fold)
    ins = insample_scores(g, design)
    pos = design.positive
    return Separability(hedges_g(held[pos], held[~pos]), accuracy(held, pos), auroc(held, pos),
                        hedges_g(ins[pos], ins[~pos]), accuracy(ins, pos), auroc(ins, pos), held, ins)


def heldout_separability(x: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray,
                         groups: Sequence[Hashable | None] | None = None, *, folds: Folds = 5,
                         seed: int | np.random.Generator = 0) -> Separability:
    """Pair-aware k-fold (or leave-one-pair-out) separability of the mean-difference direction."""
    design = Design.build(labels, groups)
    return separability_from_gram(gram(x), design, assign_folds(design, folds, seed))


# --------------------------------------------------------------------------- permutation test


@dataclass(frozen=True)
class PermutationResult:
    observed: float  # in-sample g of the fitted direction
    p_value: float
    null: np.ndarray  # in-sample g of the direction refitted on each permutation


def permuted_labels(design: Design, n_permutations: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """[n_perm, n] bool labels. When every cluster holds both labels (pairs), labels are shuffled
    within clusters (for pairs: a random sign flip of each pair's difference); otherwise globally."""
    rng = _rng(seed)
    comp = design.composition()
    within = bool((comp > 0).all())
    block = design.cluster if within else np.zeros(design.n, dtype=np.int64)
    order = np.argsort(block, kind="stable")
    keys = block[order][None, :] + rng.random((n_permutations, design.n))
    shuffled = order[np.argsort(keys, axis=1)]
    out = np.empty((n_permutations, design.n), dtype=bool)
    out[:, order] = design.positive[shuffled]
    return out


def permutation_p(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + n_perm), with a relative tolerance for float ties."""
    null = np.asarray(null, dtype=np.float64)
    if not np.isfinite(observed):
        return math.nan
    hits = np.count_nonzero(np.nan_to_num(null, nan=-np.inf) >= observed - 1e-9 * abs(observed))
    return float((1 + hits) / (1 + null.size))


def permutation_test_from_gram(g: np.ndarray, design: Design, labels: np.ndarray,
                               fold: np.ndarray | None = None) -> PermutationResult:
    """Refit test: in-sample g (``fold`` None) or cross-fitted g (``fold`` given) as the statistic."""
    observed = float(refit_g(g, design.positive, None, fold)[0])
    null = refit_g(g, labels, None, fold)
    return PermutationResult(observed, permutation_p(observed, null), null)


def permutation_test(x: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray,
                     groups: Sequence[Hashable | None] | None = None, *, n_permutations: int = 1000,
                     statistic: Literal["in_sample", "heldout"] = "heldout", folds: Folds = 5,
                     seed: int | np.random.Generator = 0) -> PermutationResult:
    """Does the fitted direction separate the groups better than one fitted to permuted labels?

    Both statistics refit the direction on every permutation, so both account for the fitting.
    ``"heldout"`` (default): the cross-fitted g, refitted per fold and permutation.
    ``"in_sample"``: the in-sample g of the refitted direction. It loses its power when variance
    is uneven across dimensions (as in real activations): a direction fitted to permuted labels
    picks up the quiet dimensions, where a tiny mean difference is many SDs, so the null
    distribution reaches the real statistic. Such directions earn nothing on held-out rows.
    """
    rng = _rng(seed)
    design = Design.build(labels, groups)
    fold = assign_folds(design, folds, rng) if statistic == "heldout" else None
    return permutation_test_from_gram(gram(x), design, permuted_labels(design, n_permutations, rng), fold)


# --------------------------------------------------------------------------- multiple testing


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error); NaNs stay NaN and do not count."""
    return _adjusted(p_values, lambda p: np.maximum.accumulate(p * (p.size - np.arange(p.size))))


def benjamini_hochberg(p_values: Iterable[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate); NaNs stay NaN and do not count."""
    return _adjusted(p_values, lambda p: np.minimum.accumulate((p * p.size / np.arange(1, p.size + 1))[::-1])[::-1])


def _adjusted(p_values: Iterable[float], adjust: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``adjust`` of the finite p-values in ascending order, capped at 1, back in their places."""
    p = np.asarray(list(p_values), dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok], kind="stable")]
        out[order] = np.minimum(adjust(p[order]), 1.0)
    return out


# --------------------------------------------------------------------------- geometry


def cosine_matrix(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """[k, k] cosine similarities between the rows of ``vectors`` (a zero row gives NaN)."""
    v = torch.as_tensor(vectors).to(torch.float64)
    norms = v.norm(dim=1)
    unit = v / norms.clamp_min(1e-300)[:, None]
    out = (unit @ unit.T).clamp(-1, 1).numpy()
    dead = (norms <= 1e-12).numpy()
    out[dead, :] = np.nan
    out[:, dead] = np.nan
    return out


# --------------------------------------------------------------------------- layer recommendation


def recommend_layers(layers: Sequence[int], strength: Sequence[float], *, max_fraction: float = 0.25,
                     tolerance: float = 0.1, label: str = "held-out g lower 95% bound"
                     ) -> tuple[list[int], str]:
    """The widest contiguous window of layers that is about as strong as the best single layer.

    ``strength`` should be conservative (the lower CI bound of the held-out effect), so a layer
    wins by being reliably strong, not by one lucky estimate. Windows may not include the first
    or last layer (embedding-adjacent and unembedding-adjacent layers make poor intervention
    points), every layer in the window must have positive strength, and the window's mean
    strength must be within ``tolerance`` of the best single layer; among those the widest
    (up to ``max_fraction`` of all layers) wins, ties broken by mean strength.
    """
    layers = list(layers)
    s = np.nan_to_num(np.asarray(strength, dtype=np.float64), nan=-np.inf)
    if not layers:
        return [], "No layers were analysed."
    inner = list(range(1, len(layers) - 1)) if len(layers) >= 3 else list(range(len(layers)))
    best = max(inner, key=lambda i: s[i])
    if not s[best] > 0:
        return [], (f"No layer is recommended: no eligible layer has a {label} above 0, so no direction "
                    "separates the groups reliably on held-out prompts.")
    max_width = max(1, round(max_fraction * len(layers)))
    floor = s[best] - tolerance * abs(s[best])
    choice = (1, s[best], best)
    for width in range(2, max_width + 1):
        for start in range(inner[0], inner[-1] - width + 2):
            window = s[start:start + width]
            mean = float(window.mean())
            if (window > 0).all() and mean >= floor and (width, mean) > choice[:2]:
                choice = (width, mean, start)
    width, mean, start = choice
    chosen = layers[start:start + width]
    span = f"layer {chosen[0]}" if width == 1 else f"layers {chosen[0]}–{chosen[-1]}"
    reason = (f"Recommended {span}: the widest contiguous window (at most {max_width} of {len(layers)} "
              f"layers, first and last layer excluded) whose every layer has a {label} above 0 and whose "
              f"mean ({mean:.2f}) is within {tolerance:.0%} of the best single layer (layer {layers[best]}, "
              f"{s[best]:.2f}).")
    return chosen, reason

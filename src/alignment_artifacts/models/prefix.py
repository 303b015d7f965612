"""Prompts that start alike: the prefix they share, its reusable KV cache, and the batches after it.

Chat prompts share a long prefix (system prompt, role markers). ``generation.shared_prefix``
runs it once; every batch then feeds only what follows it, left-padded between the prefix and
the rest so that positions continue the prefix in every row.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row shares, leaving at least one token per row."""
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


def expandable(cache: Any) -> bool:
    """Whether a batch-of-one cache can be copied to a batch (sliding-window layers cannot)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def droppable(cache: Any) -> bool:
    """Whether rows can leave ``cache`` by batch index: attention caches only (a recurrent layer's state
    is another shape, and some caches cannot select)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer")
                                for layer in layers) and hasattr(cache, "batch_select_indices")


@dataclass
class SharedPrefix:
    """Tokens every prompt starts with, run once: each batch continues from a copy of their KV cache."""

    length: int = 0
    cache: Any = None  # batch of one; None when nothing is shared

    def cache_for(self, batch: int) -> Any:
        """A copy of the prefix's cache for ``batch`` rows (None when nothing is shared)."""
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


def pad_after_prefix(rows: Sequence[Sequence[int]], shared: int, pad_id: int, device: torch.device | str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens after the ``shared`` prefix, left-padded, and the attention mask over the
    prefix and them: padding sits between the two, so ``positions_from_mask`` continues the prefix.
    With ``shared=0`` it is plain left padding: every batch the toolkit runs is built here."""
    length = max(len(r) for r in rows) - shared
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + length), dtype=torch.long)
    mask[:, :shared] = 1
    for i, row in enumerate(rows):
        suffix = row[shared:]
        ids[i, length - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[i, shared + length - len(suffix):] = 1
    return ids.to(device), mask.to(device)


def _pad_left(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    spec = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, spec)


def join_rows(cache: Any, mask: torch.Tensor | None, new_cache: Any, new_mask: torch.Tensor
              ) -> tuple[Any, torch.Tensor]:
    """Prefilled rows (``new_cache``, ``new_mask``) stacked under running ones (``cache``, ``mask``; None:
    none yet), both left-padded to the longer length: positions come from the mask, so every row keeps
    its own. ``cache`` is extended in place; plain growing caches only (``expandable``)."""
    if cache is None or mask is None:
        return new_cache, new_mask
    length = max(mask.shape[1], new_mask.shape[1])
    for mine, theirs in zip(cache.layers, new_cache.layers):
        mine.keys = torch.cat([_pad_left(mine.keys, length, -2), _pad_left(theirs.keys, length, -2)])
        mine.values = torch.cat([_pad_left(mine.values, length, -2), _pad_left(theirs.values, length, -2)])
    return cache, torch.cat([_pad_left(mask, length, 1), _pad_left(new_mask, length, 1)])


def keep_rows(cache: Any, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep rows ``index`` of ``cache`` (in place) and return their mask, without the leading columns
    no kept row uses (cut from plain caches only: a sliding-window layer holds its last tokens, not one
    column per mask position)."""
    cache.batch_select_indices(index.cpu())  # a CPU index serves layers on any device (a split model)
    mask = mask[index.to(mask.device)]
    unused = int(mask.any(0).long().argmax())
    if unused and expandable(cache):
        mask = mask[:, unused:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
    return mask

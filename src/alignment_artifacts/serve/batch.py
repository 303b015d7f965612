"""The rows that decode together: one KV cache, per-row sampling, and steering confined to its rows.

Rows are left-padded, like every batch in this toolkit: positions come from the attention mask,
so a row joining a running batch (its prompt prefilled on its own, then its cache padded on the
left and stacked under the others) sees exactly the positions it would see alone. Finished rows
leave the cache, and columns no remaining row uses are cut from the left.

Steering with several configurations in one batch: each configuration's hooks are installed
once (``apply_steering(..., wrap=group.wrap)``) and every hook body runs on that
configuration's rows only. All modes act on each row independently, so a row's activations are
those it would have alone; rows of other configurations pass through untouched.

A gated configuration (``steering.gate``) decides per prompt from an unmodified pass up to its
gate layer, run before each prefill. Here the engine keeps each row's decision (``Row.decision``):
a prefill with the configuration's new rows decides them (its hooks see those rows only, so the
decision is theirs), and every other pass hands the gate the kept decisions of its rows
(``Gate.hold``). While that decision pass runs, the other configurations' hooks sit it out, so
they count nothing twice. The model holds one gate at a time: one gated configuration per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.generation import apply_repetition_penalty
from ..models.generation import sample as sample_token
from ..models.prefix import expandable, join_rows, keep_rows
from ..steering import Gate
from .jobs import Job, TextTracker

SiteFn = Callable[[torch.Tensor], Any]


class RowSteering:
    """One steering configuration in the batch: its installed hooks act on its own rows of each pass.

    Before every forward pass the engine calls ``select``: which rows of that pass are this
    configuration's (None: none), which positions are real (not left padding), the per-row
    counters of changed positions, which become each request's ``interventions``, and the gates:
    this configuration's kept decisions for its rows, and the batch's gate if another's.
    """

    def __init__(self, key: str):
        self.key = key
        self.stack = contextlib.ExitStack()  # holds apply_steering's context: closing it removes the hooks
        self.members = 0  # rows of the batch (or being admitted) with this configuration
        self.index: torch.Tensor | None = None
        self.whole = False
        self.valid: torch.Tensor | None = None
        self.counts = torch.zeros(0, dtype=torch.long)
        self.gate: Gate | None = None  # its own per-prompt gate, if gated
        self.decider: Gate | None = None  # another configuration's gate: its decision pass runs without us

    def select(self, index: torch.Tensor | None, whole: bool, valid: torch.Tensor | None,
               counts: torch.Tensor, decided: torch.Tensor | None = None, decider: Gate | None = None) -> None:
        """``valid`` [rows, seq]: the positions that count (None: all of them). ``decided``: the gate's
        decisions for this pass's rows of ours (None: this prefill decides them)."""
        self.index, self.whole, self.counts, self.decider = index, whole, counts, decider
        self.valid = None if valid is None or index is None else valid[index]
        if self.gate is not None:
            self.gate.hold(decided)

    def wrap(self, fn: SiteFn) -> SiteFn:
        """``fn`` applied to this configuration's rows only; the other rows are returned as they came."""

        def hook(h: torch.Tensor) -> torch.Tensor | None:
            if self.index is None or (self.decider is not None and self.decider.deciding):
                return None
            index = self.index.to(h.device)
            mine = h if self.whole else h.index_select(0, index)
            new = fn(mine)
            if new is None or new is mine:
                return None
            changed = (new != mine).any(-1)
            if self.valid is not None:
                changed = changed & self.valid.to(h.device)
            changed = changed.sum(-1)
            self.counts.index_add_(0, self.index, changed.to(self.counts.device))
            return new if self.whole else h.index_copy(0, index, new)

        return hook


@dataclass
class Row:
    job: Job
    tracker: TextTracker
    group: RowSteering | None  # None: unsteered
    prompt: list[int]
    seen: torch.Tensor  # ids the repetition penalty looks at: the prompt, then each sampled id
    generator: torch.Generator | None = None  # per row, so a seeded request samples as it would alone
    token: int = 0  # the last sampled id, fed at the next step
    done: bool = False
    retired: bool = False
    interventions: int = 0
    cancelled: bool = False
    # a gated row's gate decision [1], made at its prefill (other rows: empty)
    decision: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def sample(self, logits: torch.Tensor, greedy: int) -> None:
        """Pick the next id from this row's logits [1, vocab] (``greedy``: their argmax, computed for the batch)."""
        config = self.job.generation
        if config.temperature == 0 and config.repetition_penalty == 1.0:
            self.token = greedy
        else:
            scored = apply_repetition_penalty(logits, self.seen, config.repetition_penalty)
            self.token = int(sample_token(scored, config, self.generator))
        if config.repetition_penalty != 1.0:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([[self.token]])], dim=1)
        self.done = self.tracker.feed(self.token)


def new_row(job: Job, tracker: TextTracker, group: RowSteering | None, prompt: list[int],
            device: torch.device) -> Row:
    config = job.generation
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    return Row(job, tracker, group, prompt, torch.tensor([prompt], device=device), generator)


@dataclass
class Batch:
    """The running rows with their KV cache, attention mask [rows, length] and intervention counters."""

    rows: list[Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def joinable(self) -> bool:
        """Whether rows can join while others decode: plain growing caches only (not sliding windows)."""
        return not self.rows or expandable(self.cache)

    def add(self, rows: list[Row], cache: Any, mask: torch.Tensor, counts: torch.Tensor) -> None:
        """Stack prefilled rows under the running ones, both left-padded to the longer length."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.counts = rows, cache, mask, counts
            return
        assert self.mask is not None and self.counts is not None
        self.cache, self.mask = join_rows(self.cache, self.mask, cache, mask)
        self.counts = torch.cat([self.counts, counts])
        self.rows = self.rows + rows

    def keep(self, indices: list[int]) -> None:
        """Drop every other row from the cache, then the leading columns no kept row uses (from plain
        caches only: a sliding-window layer holds its last tokens, not one column per mask position)."""
        if not indices:
            self.rows, self.cache, self.mask, self.counts = [], None, None, None
            return
        assert self.mask is not None and self.counts is not None
        self.rows = [self.rows[i] for i in indices]
        selected = torch.tensor(indices, device=self.mask.device)
        self.mask, self.counts = keep_rows(self.cache, self.mask, selected), self.counts[selected]

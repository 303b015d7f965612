"""The batching engine: one worker thread owns the model, and concurrent requests share its passes.

Continuous batching. Each step the worker (1) admits waiting requests: their prompts are
prefilled together and their caches joined to the running batch, (2) runs one decode pass over
every running row, (3) retires finished, timed-out and disconnected rows at once, so a freed
row costs nothing from the next step on. Each row has its own ``max_tokens``, stop strings,
sampling settings and stream.

Steering. Every distinct (resolved) configuration in the batch has its hooks installed once,
acting only on its own rows (``batch.RowSteering``), so requests with different steering share
passes and none sees another's. A gated configuration (``gate_layer``) decides per prompt when the
prompt is prefilled; each row keeps its decision, so gated rows join and leave like any other.
The model holds one gate at a time: a request with a second gated configuration waits for the
first one's rows to finish, letting later requests pass it for ``MAX_OVERTAKEN`` steps at most;
then nothing passes it, so it cannot starve. Models whose cache cannot take rows mid-decode
(sliding-window layers) batch statically: the requests waiting when a batch starts share it,
later ones join the next.

Locking. The worker holds the model lock for slices of steps; directions a request needs for the
first time are prepared outside it (``prepare``, in the request's thread), and their collection
takes the lock one batch at a time between the worker's slices.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import replace
from typing import Any

import torch
from jinja2 import TemplateError

from ..analysis.directions import DirectionSet
from ..errors import CacheError, UserError
from ..models.chat import context_length, stop_token_ids
from ..models.generation import decode_step, output_cache, prefill
from ..models.hooks import attached_passes
from ..models.prefix import pad_after_prefix
from ..steering import Gate, SteeringConfig, apply_steering
from .batch import Batch, Row, RowSteering, new_row
from .jobs import Event, Job, Result, TextTracker
from .schemas import ApiError, DirectionsFor, ServerLimits

SLICE_S = 0.25  # the worker releases the model lock this often, so a collection batch can run
MAX_OVERTAKEN = 16  # steps a request that cannot join yet lets later ones pass it


def steering_key(config: SteeringConfig) -> str | None:
    """Requests with equal keys share hooks; None: unsteered (no hooks at all)."""
    if config.mode == "none" or config.scale == 0:
        return None
    return json.dumps({k: v for k, v in config.to_json().items() if k != "notes"}, sort_keys=True, default=str)


class Engine:
    """Owns the model: every use of it or its tokenizer happens in the worker thread, under ``lock``."""

    def __init__(self, loaded: Any, directions_for: DirectionsFor, limits: ServerLimits, start: bool = True):
        """``start=False``: no worker thread; the caller drives ``step`` (tests that place each join)."""
        self.loaded, self.directions_for, self.limits = loaded, directions_for, limits
        self.lock = threading.Lock()  # the model
        self.preparing = threading.Lock()  # one direction preparation at a time
        self.stop_ids = stop_token_ids(loaded.model, loaded.tokenizer)
        self.pad_id = loaded.tokenizer.pad_token_id or 0
        self.context = context_length(loaded.model)
        self._directions: dict[tuple[Any, ...], DirectionSet | None] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.wakeup = threading.Condition()
        self.batch = Batch()
        self.groups: dict[str, RowSteering] = {}
        self.stats = {"passes": 0, "max_rows": 0, "mixed_passes": 0}  # mixed: rows of 2+ steerings in one pass
        self.closed = False
        self.worker = threading.Thread(target=self._work, name="batching-engine", daemon=True)
        if start:
            self.worker.start()

    # Outside the worker --------------------------------------------------------------------------

    def directions(self, config: SteeringConfig) -> DirectionSet | None:
        """Directions for a resolved config, memoised per source (they only depend on these fields).

        Called without the model lock: a first use may collect activations for a minute, taking
        the lock one batch at a time, while other requests keep running.
        """
        if steering_key(config) is None:
            return None
        key = (config.resolved_source(), config.resolved_direction_site(), config.resolved_direction_position(),
               tuple(config.categories or ()), config.pca_components)
        if key not in self._directions:
            with self.preparing:
                if key not in self._directions:
                    self._directions[key] = self.directions_for(config, self.lock)
        return self._directions[key]

    def prepare(self, job: Job) -> None:
        """The directions the job needs; a setting they cannot be made for is a 400, a cache fault a 500."""
        try:
            job.directions = self.directions(job.steering)
        except CacheError:
            raise
        except UserError as exc:
            raise ApiError(str(exc), param="steering", code="invalid_steering") from exc

    def submit(self, job: Job) -> None:
        """Queue a prepared job; its outcome comes back through ``job.emit``."""
        with self.wakeup:
            self.waiting.append(job)
            self.wakeup.notify()

    def load(self) -> dict[str, int]:
        return {"decoding": len(self.batch.rows), "waiting": len(self.waiting)}

    def close(self) -> None:
        with self.wakeup:
            self.closed = True
            self.wakeup.notify()

    # The worker ------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.wakeup:
                while not (self.closed or self.waiting or self.batch.rows):
                    self.wakeup.wait()
                if self.closed:
                    break
            with self.lock:
                until = time.monotonic() + SLICE_S
                while not self.closed and (self.waiting or self.batch.rows) and time.monotonic() < until:
                    self.step()
            time.sleep(0.001)  # a collection waiting for the lock gets it now
        with self.lock:
            self._fail(self.batch.rows, RuntimeError("The server is shutting down."))
            self.batch = Batch()

    def step(self) -> None:
        """Admit what can join, decode one token for every running row, retire the finished rows."""
        try:
            self._admit()
            self._retire()
            if self.batch.rows:  # (all running: finished rows have left)
                self._decode()
                self._retire()
        except Exception as exc:  # a failed pass: its rows get the error, the worker goes on
            self._fail(self.batch.rows, exc)
            self.batch = Batch()

    def _take(self) -> list[Job]:
        """The waiting jobs that join now, in order, up to the free rows. One with a second gated
        configuration waits, and is passed by later ones for ``MAX_OVERTAKEN`` steps at most."""
        taken: list[Job] = []
        with self.wakeup:
            if not self.batch.joinable():
                return taken
            room = self.limits.max_batch - len(self.batch.rows)
            gated = next((key for key, group in self.groups.items() if group.gate is not None), None)
            for job in list(self.waiting):
                if len(taken) >= room:
                    break
                key = steering_key(job.steering) if job.gated else None
                if job.cancel.is_set():
                    self.waiting.remove(job)
                elif key is None or gated in (None, key):
                    taken.append(job)
                    gated = key or gated
                else:
                    job.overtaken += 1
                    if job.overtaken > MAX_OVERTAKEN:
                        break  # nobody passes it any more: the rows in its way finish, then it runs
            for job in taken:
                self.waiting.remove(job)
        return taken

    def _admit(self) -> None:
        rows = [row for row in (self._start(job) for job in self._take()) if row is not None]
        if not rows:
            return
        try:
            ids, mask = pad_after_prefix([row.prompt for row in rows], 0, self.pad_id, self.loaded.device)
            counts = torch.zeros(len(rows), dtype=torch.long, device=self.loaded.device)
            self._route(rows, None if bool(mask.all()) else mask.bool(), counts, prefill=True)
            output = prefill(self.loaded.model, ids, mask)
            self._keep_decisions(rows)
            self._sample(rows, output.logits[:, -1, :].float())
        except Exception as exc:
            self._fail(rows, exc)
            return
        self.batch.add(rows, output_cache(output), mask, counts)

    @staticmethod
    def _keep_decisions(rows: list[Row]) -> None:
        """Each new gated row's decision, as its prefill's gate made it (in the order of its rows)."""
        gated = [row for row in rows if row.group is not None and row.group.gate is not None]
        if gated:
            assert gated[0].group is not None and gated[0].group.gate is not None
            decisions = gated[0].group.gate.open
            assert decisions is not None and len(decisions) == len(gated)
            for i, row in enumerate(gated):
                row.decision = decisions[i:i + 1]

    def _start(self, job: Job) -> Row | None:
        """A row for the job, or None after reporting why it cannot run (its prompt, its steering)."""
        tokenizer = self.loaded.tokenizer
        try:
            text = job.render(tokenizer)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            self._fit_context(job, len(prompt))
            group = self._join_group(job)
        except TemplateError as exc:
            job.emit(Event("error", error=UserError(f"The model's chat template rejected these messages: {exc}")))
            return None
        except Exception as exc:
            job.emit(Event("error", error=exc))
            return None
        job.emit(Event("ready"))
        return new_row(job, TextTracker(tokenizer, self.stop_ids, job), group, prompt, self.loaded.device)

    def _fit_context(self, job: Job, prompt_tokens: int) -> None:
        """Refuse prompts the model cannot hold; shorten a defaulted max_tokens to what is left."""
        if not 0 < prompt_tokens <= self.limits.max_prompt_tokens:
            raise ApiError(f"The prompt has {prompt_tokens} tokens; this server takes 1 to "
                           f"{self.limits.max_prompt_tokens}.", param=job.prompt_param,
                           code="context_length_exceeded")
        room = self.context - prompt_tokens if self.context else job.generation.max_tokens
        if job.generation.max_tokens <= room:
            return
        if job.max_tokens_given or room < 1:
            raise ApiError(f"The prompt ({prompt_tokens} tokens) plus max_tokens ({job.generation.max_tokens}) "
                           f"exceeds the model's context of {self.context} tokens; lower max_tokens or shorten "
                           "the prompt.", param="max_tokens", code="context_length_exceeded")
        job.generation = replace(job.generation, max_tokens=room)

    def _join_group(self, job: Job) -> RowSteering | None:
        """The job's steering group, installing its hooks if it is new; a config the directions cannot
        serve is a 400."""
        key = steering_key(job.steering)
        if key is None:
            return None
        group = self.groups.get(key)
        if group is None:
            group = RowSteering(key)
            try:
                group.stack.enter_context(apply_steering(self.loaded, job.steering, job.directions, wrap=group.wrap))
            except UserError as exc:
                group.stack.close()
                raise ApiError(str(exc), param="steering", code="invalid_steering") from exc
            passes = attached_passes(self.loaded.model)  # the gate apply_steering attached, if gated
            group.gate = passes if job.gated and isinstance(passes, Gate) else None
            self.groups[key] = group
        group.members += 1
        return group

    def _leave_group(self, row: Row) -> None:
        group, row.group = row.group, None
        if group is None:
            return
        group.members -= 1
        if group.members == 0:
            del self.groups[group.key]
            group.stack.close()

    def _route(self, rows: list[Row], valid: torch.Tensor | None, counts: torch.Tensor, prefill: bool) -> None:
        """Tell every installed steering which rows of the coming pass are its own (and a gate its
        rows' decisions, unless this prefill starts some of them and so decides them all)."""
        members: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            members.setdefault(None if row.group is None else row.group.key, []).append(i)
        gate = next((group.gate for group in self.groups.values() if group.gate is not None), None)
        for key, group in self.groups.items():
            index = members.get(key)
            selected = None if index is None else torch.tensor(index, device=counts.device)
            decided = None
            if group.gate is not None and not (prefill and index is not None):
                kept = [rows[i].decision for i in index or []]
                decided = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool)
            group.select(selected, index is not None and len(index) == len(rows), valid, counts, decided,
                         None if gate is group.gate else gate)
        self.stats["passes"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        self.stats["mixed_passes"] += len(members) > 1

    def _decode(self) -> None:
        batch = self.batch
        assert batch.mask is not None and batch.counts is not None
        tokens = torch.tensor([[row.token] for row in batch.rows], device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        self._route(batch.rows, None, batch.counts, prefill=False)
        output = decode_step(self.loaded.model, tokens, batch.mask, batch.cache)
        batch.cache = output_cache(output)
        self._sample(batch.rows, output.logits[:, -1, :].float())

    @staticmethod
    def _sample(rows: list[Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            row.sample(logits[i:i + 1], greedy[i])

    def _retire(self) -> None:
        """Drop finished and cancelled rows (removing hooks no row needs), then report the finished ones."""
        batch = self.batch
        for row in batch.rows:
            if not row.done and row.job.cancel.is_set():
                row.done = row.cancelled = True
        finished = [row for row in batch.rows if row.done and not row.retired]
        if not finished:
            return
        assert batch.counts is not None
        counts = batch.counts.tolist()
        for i, row in enumerate(batch.rows):
            row.interventions = counts[i]
        batch.keep([i for i, row in enumerate(batch.rows) if not row.done])
        for row in finished:
            self._leave_group(row)
            row.retired = True
            if not row.cancelled:
                row.tracker.close()
                row.job.emit(Event("done", result=Result(row.tracker.text, row.tracker.finish, len(row.prompt),
                                                         row.tracker.steps, row.interventions)))

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        """Report a failed pass to each of its rows that still waits for an answer; release their hooks."""
        for row in rows:
            if not row.retired:
                row.retired = True
                row.job.emit(Event("error", error=exc))
            self._leave_group(row)

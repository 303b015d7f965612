"""One request as the engine sees it: what to generate, how it reports back, and its text so far.

A job talks to its HTTP handler only through ``emit`` (events, called from the engine's worker
thread) and ``cancel`` (set by the handler on a timeout or a disconnect; the worker drops the
row at its next step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..analysis.directions import DirectionSet
from ..models.generation import GenerationConfig
from ..steering import SteeringConfig


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    interventions: int


@dataclass
class Event:
    kind: Literal["ready", "delta", "done", "error"]
    text: str = ""
    result: Result | None = None
    error: BaseException | None = None


def _ignore(_: Event) -> None:
    """The default ``emit``: a job nobody listens to."""


@dataclass
class Job:
    render: Callable[[Any], str]  # tokenizer -> the exact prompt text
    generation: GenerationConfig
    steering: SteeringConfig  # resolved
    stop: list[str]
    prompt_param: str = "messages"  # what an error about the prompt points at
    max_tokens_given: bool = True  # False: the server default, shortened to fit the context
    emit: Callable[[Event], None] = _ignore
    cancel: threading.Event = field(default_factory=threading.Event)
    directions: DirectionSet | None = None  # prepared before the job reaches the engine
    overtaken: int = 0  # steps it waited unable to join (later requests may pass it meanwhile)

    @property
    def gated(self) -> bool:
        """A gated steering: the model holds one gate at a time, so a batch holds one gated configuration."""
        return self.steering.gate_layer is not None and self.steering.mode != "none" and self.steering.scale != 0


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class TextTracker:
    """Turns one row's sampled ids into text deltas and decides when (and why) it stops."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], job: Job):
        self.tokenizer, self.stop_ids, self.job = tokenizer, set(stop_ids), job
        self.ids: list[int] = []
        self.text, self.sent, self.steps, self.finish = "", 0, 0, "length"
        self.cut = False

    def feed(self, value: int) -> bool:
        """Take the next sampled id; True when the row is finished (end token, stop string, max_tokens)."""
        self.steps += 1
        if value in self.stop_ids:
            self.finish = "stop"
            return True
        self.ids.append(value)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
            self.text = text
            hits = [i for i in (text.find(stop, max(0, self.sent - len(stop))) for stop in self.job.stop) if i >= 0]
            if hits:
                self.text, self.finish, self.cut = text[:min(hits)], "stop", True
                self._send(len(self.text))
                return True
            self._send(len(text) - held_back(text, self.job.stop))
        return self.steps >= self.job.generation.max_tokens

    def close(self) -> None:
        """Send what was held back (a stop-string prefix that never completed, a partial character)."""
        if not self.cut:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.emit(Event("delta", self.text[self.sent:upto]))
        self.sent = max(self.sent, upto)

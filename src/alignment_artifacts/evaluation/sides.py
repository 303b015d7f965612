"""The building blocks of an evaluation: its settings, its prompt sets, and the two sides it compares.

``Measurer`` runs a model (steered or not) over the groups and judges its answers;
``measure_in_chunks`` does so chunk by chunk, saving each group's labels and flags (``SideFiles``)
after every chunk, so an interrupted run resumes at its chunk. ``Baseline`` is the unmodified side,
computed once per model, prompt sets and judge and cached group by group (labels, flags, logits and
gate-layer activations only; never an answer's text). ``groups.py`` measures a steered side the same
way and compares it with the baseline.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import atomic_save_safetensors, atomic_write_json, cache_dir, stable_hash
from ..capability import CapabilityTask, capability_tasks, is_correct
from ..errors import UserError
from ..judge import Judge
from ..models.chat import check_fits, context_length
from ..models.loading import LoadedModel
from ..models.thinking import DEFAULT_THINKING_BUDGET, ThinkingFormat, check_mode, thinking_format
from ..prompts import PromptSet, resolve_prompts
from ..steering import Steering
from .metrics import has_broad_marker, is_refusal, refusal_log_odds, refusal_opening_ids
from .passes import chat_texts, first_logits, generate_answers, last_token_states
from .results import GROUPS, Side, group_fields

# a side is answered in equal chunks of at most this many generation widths, each saved once
# judged: what an interruption can lose. Each chunk's end drains the batch (its last rows decode with the
# batch half empty), about max-tokens decoding steps: `bench/baseline_chunks.py --chunk-widths 2` (329
# prompts in two chunks) took 686 s on the builtin Qwen (2-core CPU, float32) against 644 s in one queue,
# 0.94x (chunks of 256 and 73, before they were equal: 0.90x). At 4, that set is one chunk, and evaluate's
# 754 default prompts are two
CHUNK_WIDTHS = 4


@dataclass
class EvaluationSettings:
    harmful: str = "harmful"
    borderline: str = "borderline:val"  # its label-0 prompts (safe ones that sound sensitive) are evaluated
    ordinary: str = "ordinary:val"
    n_harmful: int | None = None
    n_borderline: int | None = None
    n_ordinary: int | None = None
    n_capability: int = 300
    capability_seed: int = 0  # optimize tunes on another seed's tasks
    groups: tuple[str, ...] = GROUPS
    # answers generated and judged for over-refusal (None: all); KL is always measured on every prompt.
    # optimize's checks judge fewer: generation, not the first-token KL, is what a check costs
    judged_borderline: int | None = None
    judged_ordinary: int | None = None
    max_tokens: int = 48
    capability_max_tokens: int = 48
    batch_size: int = 16
    generation_batch_size: int = 128  # decoding is memory-bound on CPUs: wide batches cost little more per step
    system: str | None = None
    thinking: str = "auto"  # reasoning models: auto (the template's default), on, off (models/thinking.py)
    thinking_budget: int = DEFAULT_THINKING_BUDGET  # tokens added to max_tokens when the model thinks first

    def validate(self) -> None:
        check_mode(self.thinking)
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown or not self.groups:
            raise UserError(f"Unknown evaluation group(s) {unknown or '(none)'}; choose from {', '.join(GROUPS)}.")
        for name in ("n_harmful", "n_borderline", "n_ordinary", "n_capability"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")


@dataclass
class GroupSets:
    """The prompts of every group, as plain user messages (chat formatting happens per model)."""

    harmful: list[str]
    borderline: list[str]
    ordinary: list[str]
    capability: list[CapabilityTask]

    def hashes(self) -> dict[str, str]:
        return {"harmful": stable_hash(self.harmful), "borderline": stable_hash(self.borderline),
                "ordinary": stable_hash(self.ordinary),
                "capability": stable_hash([asdict(t) for t in self.capability])}


def _texts(spec: str, label: int, n: int | None, keep_label: int | None = None) -> list[str]:
    prompt_set: PromptSet = resolve_prompts(spec, label=label)
    texts = [p.text for p in prompt_set.prompts if keep_label is None or p.label == keep_label]
    if not texts:
        which = "" if keep_label is None else f"label-{keep_label} "
        raise UserError(f"The prompt set '{spec}' has no {which}prompts to evaluate.")
    return texts[:n] if n is not None else texts


def load_group_sets(settings: EvaluationSettings) -> GroupSets:
    wanted = set(settings.groups)
    return GroupSets(
        harmful=_texts(settings.harmful, 1, settings.n_harmful) if "harmful" in wanted else [],
        borderline=_texts(settings.borderline, 0, settings.n_borderline, keep_label=0) if "borderline" in wanted
        else [],
        ordinary=_texts(settings.ordinary, 0, settings.n_ordinary) if "ordinary" in wanted else [],
        capability=capability_tasks(settings.n_capability, settings.capability_seed) if "capability" in wanted
        else [])


class Measurer:
    """Runs one model (as it is now: steered or not) over the groups and judges its answers.

    Generation happens inside whatever steering context the caller holds; judging happens after
    the caller leaves it (``judge_pending``), because a model judge may be the evaluated model.
    """

    def __init__(self, loaded: LoadedModel, sets: GroupSets, settings: EvaluationSettings, progress: Any = None):
        self.loaded, self.sets, self.settings, self.progress = loaded, sets, settings, progress
        self.thinking = evaluation_thinking(loaded, settings)
        self.texts = {name: chat_texts(loaded, getattr(sets, name), settings.system, self.thinking.kwargs)
                      for name in ("harmful", "borderline", "ordinary")}
        self.answer_texts = {name: answer_texts(loaded, self.thinking, getattr(sets, name), settings.system)
                             for name in ("harmful", "borderline", "ordinary")}
        self.capability_texts = chat_texts(loaded, [t.prompt for t in sets.capability], settings.system,
                                           self.thinking.kwargs)
        self.opening = refusal_opening_ids(loaded.tokenizer)
        self.pending: dict[str, list[str]] = {}  # group -> answers waiting for the judge (memory only)
        self.steps: dict[str, int] = {}  # group -> decoding steps its rows took (what its answers cost)

    def prompts(self, group: str) -> list[str]:
        """The chat-formatted prompts a group's answers are generated from."""
        return self.capability_texts if group == "capability" else self.texts[group]

    def check_context(self) -> None:
        """Every prompt fits the model's context with room for its answer (before anything is computed)."""
        context = context_length(self.loaded.model)
        for name in GROUPS:
            texts = self.prompts(name)
            check_fits(self.loaded.tokenizer, texts, context, self.thinking.max_tokens(self.settings.max_tokens),
                       f"the {name} group")

    def answers(self, side: Side, limits: dict[str, int | None]) -> None:
        """Generate the answers of the groups in ``limits`` (each: only its first prompts, or all for
        None) in one queue, and record the proxy and markers that need no judge.

        One queue keeps the batch full: per group, the tail of each group's answers decoded at a few
        rows, and a group smaller than the batch never filled it. Each answer is the one its prompt
        gets alone, so grouping changes no answer.
        """
        s, thinking = self.settings, self.thinking
        texts: list[str] = []
        budgets: list[int] = []
        spans: dict[str, slice] = {}
        for group, limit in limits.items():
            prompts = self.prompts(group)[:limit]
            tokens = s.capability_max_tokens if group == "capability" else s.max_tokens
            spans[group] = slice(len(texts), len(texts) + len(prompts))
            texts += prompts
            budgets += [thinking.max_tokens(tokens)] * len(prompts)
        if not texts:
            return
        answers = generate_answers(self.loaded, texts, budgets, s.generation_batch_size, self.progress)
        for group, span in spans.items():
            self.steps[group] = sum(len(ids) + 1 for ids in answers.ids[span])
            self._record(group, side, answers.texts[span], answers.first_logits[span])

    def _record(self, group: str, side: Side, texts: list[str], first: torch.Tensor) -> None:
        thinking = self.thinking
        parts = [thinking.split(a) for a in texts]
        replies = [p.answer for p in parts]  # markers and the judge see the answer, never the thinking
        if group == "capability":
            side.capability_correct = [is_correct(t, a) for t, a in zip(self.sets.capability, replies)]
            return
        if group in ("harmful", "borderline"):
            setattr(side, f"{group}_thinking_refusals", [bool(p.thinking) and is_refusal(p.thinking) for p in parts])
            setattr(side, f"{group}_unfinished", [not p.finished for p in parts])
        if group == "harmful":
            side.harmful_markers = [is_refusal(a) for a in replies]
            side.harmful_broad = [has_broad_marker(a) for a in replies]
            if thinking.thinks:  # the first answer token's logits, not <think>'s
                first = first_logits(self.loaded, self.answer_texts[group][:len(texts)], self.settings.batch_size)
            side.harmful_odds = refusal_log_odds(first, self.opening).tolist()
        self.pending[group] = replies

    def logits(self, group: str) -> torch.Tensor:
        """First-answer-token logits under the caller's steering (which says whether prompts share a
        prefix); a reasoning model's prompt closes an empty thinking block first."""
        return first_logits(self.loaded, self.answer_texts[group], self.settings.batch_size)

    def judge_pending(self, judge: Judge, side: Side) -> None:
        for group, answers in self.pending.items():
            verdicts = judge.judge(getattr(self.sets, group)[:len(answers)], answers)
            setattr(side, f"{group}_labels", [v.label for v in verdicts])
        self.pending.clear()


class SideFiles:
    """Where a side's groups are saved in ``folder``: ``<group>-<judge>.json`` once whole
    (``capability.json``: not judged), ``<group>-<judge>.part.json`` while measured."""

    def __init__(self, folder: Path, judge: Judge):
        self.folder, self.judge = folder, judge

    def path(self, group: str) -> Path:
        suffix = f"-{stable_hash(self.judge.key, 8)}" if group != "capability" else ""
        return self.folder / f"{group}{suffix}.json"

    def part_path(self, group: str) -> Path:
        return self.path(group).with_suffix(".part.json")

    def read(self, group: str) -> dict[str, Any] | None:
        """A whole group's fields and ``seconds``, or None if it is not whole yet (a whole group's part
        file, left by a run killed between the two writes, is removed)."""
        path = self.path(group)
        if not path.is_file():
            return None
        self.part_path(group).unlink(missing_ok=True)
        stored: dict[str, Any] = json.loads(path.read_text())
        return stored

    def read_part(self, group: str, prompts: int) -> dict[str, Any]:
        """What an interrupted measurement of ``group`` (``prompts`` to answer) saved: its fields for the
        first ``done`` prompts (nothing, if the part file is missing or damaged)."""
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            part = json.loads(self.part_path(group).read_text())
            done = part["done"]
            if (isinstance(done, int) and 0 <= done < prompts and part["seconds"] >= 0
                    and all(isinstance(part[name], list) and len(part[name]) == done for name in group_fields(group))):
                return part
        return {"done": 0, "seconds": 0.0, **{name: [] for name in group_fields(group)}}

    def write_part(self, group: str, part: dict[str, Any], whole: bool) -> None:
        partial = self.part_path(group)
        if not whole:
            atomic_write_json(partial, part)
            return
        atomic_write_json(self.path(group), {**{n: part[n] for n in group_fields(group)}, "seconds": part["seconds"]})
        partial.unlink(missing_ok=True)

    def discard(self, groups: Iterable[str], others: Iterable[Path] = ()) -> None:
        """Remove the files of ``groups`` and ``others``, then the folder and its parent if that left them
        empty: only this side's own files, never another writer's temporaries."""
        for path in [*(p for g in groups for p in (self.path(g), self.part_path(g))), *others]:
            path.unlink(missing_ok=True)
        for folder in (self.folder, self.folder.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()


def measure_in_chunks(loaded: LoadedModel, sets: GroupSets, settings: EvaluationSettings, judge: Judge,
                      files: SideFiles, prompts: dict[str, int], steering: Steering | None = None,
                      progress: Any = None) -> tuple[Side, dict[str, float]]:
    """The side of the groups in ``prompts``, and the seconds each took (as saved with it): each group
    read from its whole file, else measured by answering its first ``prompts[group]`` prompts of
    ``sets`` under ``steering`` (None: the model as it is) and judging them outside it (a model judge
    may be the evaluated model).

    The groups still to measure share one queue per chunk. Chunks are equal and sized by the whole side,
    so a resumed run's chunks, and hence its batches, are the uninterrupted run's.
    """
    side, seconds = Side(), {}
    parts: dict[str, dict[str, Any]] = {}
    for group in prompts:
        stored = files.read(group)
        if stored is None:
            parts[group] = files.read_part(group, prompts[group])
            continue
        seconds[group] = stored.pop("seconds", 0.0)
        for name, value in stored.items():
            setattr(side, name, value)
    total, widest = sum(prompts.values()), CHUNK_WIDTHS * settings.generation_batch_size
    chunk = -(-total // max(1, -(-total // widest)))
    for group in parts:
        if not prompts[group]:  # nothing to answer (e.g. --judged-ordinary 0): whole as it is
            files.write_part(group, parts[group], whole=True)
    while any(parts[g]["done"] < prompts[g] for g in parts):
        spans = _next_chunk({g: parts[g]["done"] for g in parts}, prompts, chunk)
        subset = GroupSets(**{g: getattr(sets, g)[spans[g]] if g in spans else [] for g in GROUPS})
        started, piece = time.perf_counter(), Side()
        measurer = Measurer(loaded, subset, settings, progress)
        with steering.apply(loaded) if steering is not None else contextlib.nullcontext():
            measurer.answers(piece, {g: None for g in spans})
        measurer.judge_pending(judge, piece)
        took, steps = time.perf_counter() - started, measurer.steps
        for group, span in spans.items():  # the groups shared one queue: each pays its share of the decoding
            part = parts[group]
            for name in group_fields(group):
                part[name] = part[name] + list(getattr(piece, name))
            part["done"] = span.stop
            part["seconds"] += took * steps[group] / max(1, sum(steps.values()))
            files.write_part(group, part, whole=span.stop == prompts[group])
    for group, part in parts.items():
        seconds[group] = part["seconds"]
        for name in group_fields(group):
            setattr(side, name, part[name])
    return side, seconds


def _next_chunk(done: dict[str, int], prompts: dict[str, int], chunk: int) -> dict[str, slice]:
    """The next ``chunk`` prompts still to answer, group after group."""
    spans: dict[str, slice] = {}
    for group, start in done.items():
        take = min(prompts[group] - start, chunk - sum(x.stop - x.start for x in spans.values()))
        if take > 0:
            spans[group] = slice(start, start + take)
    return spans


class Baseline:
    """The unmodified model's side of every comparison, cached on disk group by group."""

    def __init__(self, loaded: LoadedModel, sets: GroupSets, settings: EvaluationSettings, judge: Judge):
        """``loaded`` is the reference model: the evaluated one, or the base model of an export."""
        self.loaded, self.sets, self.settings, self.judge = loaded, sets, settings, judge
        Measurer(loaded, sets, settings).check_context()
        thinking = evaluation_thinking(loaded, settings)
        self.key = stable_hash({"weights": loaded.info.weights_hash, "dtype": loaded.info.dtype,
                                "sets": sets.hashes(), "tokens": settings.max_tokens,
                                "capability_tokens": settings.capability_max_tokens, "system": settings.system,
                                "judged_ordinary": settings.judged_ordinary,
                                **_thinking_key(thinking), "v": 4})
        self.folder = cache_dir("evaluation", self.key)
        self.files = SideFiles(self.folder, judge)
        self.thinks = thinking.thinks  # its answer prompts differ from its generation prompts
        self._side: Side | None = None
        self.seconds: dict[str, float] = {}  # what measuring each group took (cached with it): prices a validation
        self._logits: dict[tuple[str, bool], torch.Tensor] = {}

    def side(self, progress: Any = None) -> Side:
        """Labels and flags of every group, from the cache or measured (and cached) now, chunk by chunk
        (``measure_in_chunks``): an interrupted baseline resumes at the chunk it was in."""
        if self._side is None:
            s = self.settings
            # every borderline prompt is answered (collateral KL needs to know which ones the model
            # answers); a steered side answers only the first --judged-borderline of them
            prompts = {g: len(getattr(self.sets, g)[:s.judged_ordinary if g == "ordinary" else None])
                       for g in s.groups}
            self._side, self.seconds = measure_in_chunks(self.loaded, self.sets, s, self.judge, self.files, prompts,
                                                         progress=progress)
        return self._side

    def gate_states(self, group: str, site: str, layer: int, progress: Any = None) -> torch.Tensor:
        """The unmodified last-token activations at (``site``, ``layer``) of a group's prompts, which a
        gate there decides on [n, hidden] (cached: every gated configuration with this gate layer reads them)."""
        from safetensors.torch import load_file

        path = self.folder / f"{group}_gate_{site}_{layer}.safetensors"
        if path.is_file():
            states = load_file(str(path))["states"]
            if progress is not None:
                progress.update(len(states))
            return states
        texts = Measurer(self.loaded, self.sets, self.settings).prompts(group)
        states = last_token_states(self.loaded, texts, site, [layer], self.settings.batch_size, progress)[layer]
        atomic_save_safetensors({"states": states.contiguous()}, path)
        return states

    def logits(self, group: str, share_prefix: bool = True) -> torch.Tensor:
        """First-token logits of ``borderline`` or ``ordinary``, on the path the compared steering
        takes (``share_prefix``: its ``allows_prefix_sharing``)."""
        from safetensors.torch import load_file

        key = (group, share_prefix)
        if key not in self._logits:
            path = self.folder / f"{group}_logits{'' if share_prefix else '_whole'}.safetensors"
            if path.is_file():
                self._logits[key] = load_file(str(path))["logits"]
            else:
                texts = answer_texts(self.loaded, evaluation_thinking(self.loaded, self.settings),
                                     getattr(self.sets, group), self.settings.system)
                logits = first_logits(self.loaded, texts, self.settings.batch_size, share_prefix)
                atomic_save_safetensors({"logits": logits}, path)
                self._logits[key] = logits
        return self._logits[key]


def evaluation_thinking(loaded: LoadedModel, settings: EvaluationSettings) -> ThinkingFormat:
    return thinking_format(loaded.tokenizer, settings.thinking, settings.thinking_budget)


def answer_texts(loaded: LoadedModel, thinking: ThinkingFormat, texts: PromptSet | list[str], system: str | None
                 ) -> list[str]:
    """Prompts whose first generated token is an answer token, for first-token KL and refusal scores:
    a reasoning model's thinking block closed empty where its template can (``--thinking off``'s prompt)."""
    return chat_texts(loaded, texts, system, thinking.answer_kwargs if thinking.thinks else thinking.kwargs)


def _thinking_key(thinking: ThinkingFormat) -> dict[str, Any]:
    """What the thinking choice adds to the baseline's cache key (nothing for a model that never thinks)."""
    if thinking.mode == "auto" and not thinking.thinks:
        return {}
    return {"thinking": [thinking.mode, thinking.budget if thinking.thinks else 0]}

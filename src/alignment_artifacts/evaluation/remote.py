"""A model behind an OpenAI-compatible chat endpoint, measured in the four groups (docs/evaluation.md).

The endpoint answers every prompt greedily (temperature 0, ``max_tokens`` from the settings) and
the judge labels the answers, which are then dropped: only labels, marker flags, capability hits
and, for borderline and ordinary prompts, the first answer token's top log-probs are kept. They
are cached per endpoint, model, judge and request, one file per finished batch, so an interrupted
run resumes where it stopped (the content policy: no answer text on disk).

KL: an endpoint returns the top-k alternatives of a token, not its distribution. The first-token
KL(before || endpoint) is taken over a coarser partition of the vocabulary: one bucket per token
text whose probability both sides give (a local before side: each of the endpoint's top-k texts
that decodes from exactly one local token id; an endpoint before side: texts in both top-k lists),
and one bucket for all the rest. Merging outcomes never increases KL, so this is a lower bound on
the full first-token KL, equal to it when the buckets hold all the mass; it is reported as
``approximate`` with k. Without log-probs KL is reported as unavailable, never as 0.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..cache import atomic_write_json, cache_dir, stable_hash
from ..capability import CapabilityTask, is_correct
from ..endpoint import EndpointError, HttpSettings, api_key_from_env, base_url, listed_model, request_json
from ..errors import UserError
from ..judge import Judge
from ..models.loading import LoadedModel
from .groups import _bar
from .metrics import has_broad_marker, is_refusal
from .results import EvaluationResult, Side, compare
from .sides import Baseline, EvaluationSettings, GroupSets, load_group_sets

Top = list[tuple[str, float]]  # the first answer token's alternatives: (token text, log-prob)
KL_UNAVAILABLE = "KL needs log-probs from the endpoint"
APPROXIMATION = ("first-token KL(before || endpoint) over one bucket per token text that both sides give a probability "
                 "for (the endpoint's top-k, matched by text to single tokens of the other side) and one bucket for "
                 "the rest of the vocabulary: a lower bound on the full first-token KL")


@dataclass(frozen=True)
class EndpointSettings:
    url: str
    model: str | None = None  # None: the only model the server lists
    concurrency: int = 4  # requests in flight at once
    timeout: float = 120.0  # seconds per request
    retries: int = 4  # after the first attempt
    backoff: float = 0.5  # seconds before the first retry, doubling after each
    top_logprobs: int = 20  # k asked for (OpenAI's maximum); 0: do not ask, KL is then unavailable
    extra: dict[str, Any] = field(default_factory=dict)  # server-specific request fields, e.g. repeat_penalty
    option: str = "--endpoint"  # the command-line option that set ``url``, named in errors

    def validate(self) -> None:
        base_url(self.url)
        if self.concurrency < 1:
            raise UserError(f"--endpoint-concurrency must be at least 1 (got {self.concurrency}).")
        if self.retries < 0:
            raise UserError(f"--endpoint-retries must be 0 or more (got {self.retries}).")
        if not self.timeout > 0:
            raise UserError(f"--endpoint-timeout must be a positive number of seconds (got {self.timeout}).")
        if self.top_logprobs < 0:
            raise UserError(f"--endpoint-top-logprobs must be 0 (do not ask) or more (got {self.top_logprobs}).")


@dataclass
class Reply:
    text: str
    top: Top | None  # None: the server gave no log-probs for the first token


class ChatEndpoint:
    """Greedy chat completions from one model of an OpenAI-compatible server."""

    def __init__(self, endpoint: EndpointSettings):
        self.settings, self.http = endpoint, HttpSettings(endpoint.timeout, endpoint.retries,
                                                                  endpoint.backoff)
        self.base, self.api_key = base_url(endpoint.url), api_key_from_env()
        self.model = endpoint.model or listed_model(self.base, self.http, self.api_key, endpoint.option,
                                                    f"{endpoint.option}-model")
        self.url = f"{self.base}/chat/completions"
        self.name = f"endpoint:{self.base}#{self.model}"
        self.refused: str | None = None  # the server's answer when it rejected a request for log-probs

    def reply(self, messages: list[dict[str, str]], max_tokens: int, logprobs: bool) -> Reply:
        body: dict[str, Any] = {**self.settings.extra, "model": self.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": 0}
        k = self.settings.top_logprobs
        if logprobs and k and self.refused is None:
            try:
                return self._parse(self._post({**body, "logprobs": True, "top_logprobs": k}))
            except EndpointError as exc:
                if exc.status not in (400, 422):  # anything else is not about the log-probs
                    raise
                self.refused = str(exc)
        return self._parse(self._post(body))

    def _post(self, body: dict[str, Any]) -> Any:
        return request_json(self.url, body, settings=self.http, api_key=self.api_key, option=self.settings.option)

    def _parse(self, reply: Any) -> Reply:
        try:
            choice = reply["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            tokens = (choice.get("logprobs") or {}).get("content") or []
            top = [(str(e["token"]), float(e["logprob"])) for e in (tokens[0].get("top_logprobs") or [])] if tokens \
                else []
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise EndpointError(f"{self.url} answered JSON that is not a chat completion (no choices[0].message). "
                                f"Check that {self.settings.option} points at an OpenAI-compatible /v1 API.") from None
        return Reply(str(text), top or None)


@dataclass(frozen=True)
class Job:
    """One request: a prompt of a group; ``judged``: its answer gets a label (else only its first token counts)."""

    group: str
    prompt: str
    max_tokens: int
    judged: bool
    logprobs: bool
    task: CapabilityTask | None = None

    def key(self) -> str:
        return stable_hash([self.group, self.prompt, self.max_tokens, self.judged, self.logprobs], 24)


class EndpointMeasurer:
    """Fills a ``Side`` from a model at an endpoint, as ``Baseline.side`` does from a local model."""

    def __init__(self, endpoint: EndpointSettings, sets: GroupSets, settings: EvaluationSettings, judge: Judge):
        endpoint.validate()
        self.endpoint, self.sets, self.settings, self.judge = endpoint, sets, settings, judge
        self.chat = ChatEndpoint(endpoint)
        self.folder = cache_dir("endpoint-evaluation", stable_hash(
            {"url": self.chat.base, "model": self.chat.model, "system": settings.system, "judge": judge.key,
             "top_k": endpoint.top_logprobs, "extra": endpoint.extra, "v": 1}))
        self.records = _load_parts(self.folder)
        self.tops: dict[str, list[Top | None]] = {}  # borderline / ordinary: per prompt

    def side(self, progress: Any = None) -> Side:
        side = Side()
        for group in self.settings.groups:
            self._fill(group, side, self._run(self._jobs(group), progress))
        return side

    def _jobs(self, group: str) -> list[Job]:
        s = self.settings
        if group == "capability":
            return [Job(group, t.prompt, s.capability_max_tokens, False, False, t) for t in self.sets.capability]
        prompts = getattr(self.sets, group)
        judged = len(prompts) if group != "ordinary" or s.judged_ordinary is None else s.judged_ordinary
        return [Job(group, p, s.max_tokens if i < judged else 1, i < judged, group != "harmful")
                for i, p in enumerate(prompts)]

    def _run(self, jobs: list[Job], progress: Any) -> list[dict[str, Any]]:
        """Each job's record, from the cache or asked now, batch by batch; a failure keeps what came back."""
        keys = [job.key() for job in jobs]
        todo = list({key: job for key, job in zip(keys, jobs) if key not in self.records}.values())
        _update(progress, len(jobs) - len(todo))
        size = 4 * self.endpoint.concurrency
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            replies, error = self._ask(chunk)
            if replies:
                self._store([chunk[i] for i in sorted(replies)], [replies[i] for i in sorted(replies)])
            _update(progress, len(replies))
            if error is not None:
                raise error
        return [self.records[key] for key in keys]

    def _ask(self, chunk: list[Job]) -> tuple[dict[int, Reply], BaseException | None]:
        error: BaseException | None = None
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        with ThreadPoolExecutor(max_workers=min(self.endpoint.concurrency, len(chunk))) as pool:
            futures = [pool.submit(self.chat.reply, [*system, {"role": "user", "content": job.prompt}],
                                   job.max_tokens, job.logprobs) for job in chunk]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException as exc:  # a failure or Ctrl-C: ask no more, keep the replies that came back
                error = exc
                for future in futures:
                    future.cancel()
        done = {i: f for i, f in enumerate(futures) if f.done() and not f.cancelled() and f.exception() is None}
        return {i: f.result() for i, f in done.items()}, error

    def _store(self, jobs: list[Job], replies: list[Reply]) -> None:
        """Judge the answers and keep only what the groups need, written atomically as one file."""
        judged = [i for i, job in enumerate(jobs) if job.judged]
        verdicts = self.judge.judge([jobs[i].prompt for i in judged], [replies[i].text for i in judged]) \
            if judged else []
        labels = {i: v.label for i, v in zip(judged, verdicts)}
        new: dict[str, dict[str, Any]] = {}
        for i, (job, reply) in enumerate(zip(jobs, replies)):
            record: dict[str, Any] = {"label": labels[i]} if i in labels else {}
            if job.group == "harmful":
                record.update(marker=is_refusal(reply.text), broad=has_broad_marker(reply.text))
            if job.task is not None:
                record["correct"] = is_correct(job.task, reply.text)
            if job.logprobs:
                record["top"] = reply.top
            new[job.key()] = record
        atomic_write_json(self.folder / f"{stable_hash(sorted(new))}.json", new)
        self.records.update(new)

    def _fill(self, group: str, side: Side, records: list[dict[str, Any]]) -> None:
        if group == "capability":
            side.capability_correct = [r["correct"] for r in records]
            return
        setattr(side, f"{group}_labels", [r["label"] for r in records if "label" in r])
        if group == "harmful":
            side.harmful_markers = [r["marker"] for r in records]
            side.harmful_broad = [r["broad"] for r in records]
        else:
            self.tops[group] = [None if r.get("top") is None else [(t, lp) for t, lp in r["top"]] for r in records]


def _load_parts(folder: Any) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        records.update(json.loads(path.read_text()))
    return records


def _update(progress: Any, n: int) -> None:
    if progress is not None and n:
        progress.update(n)


# KL from top-k log-probs -----------------------------------------------------------------------------


def text_probs(top: Top) -> dict[str, float]:
    """Probability by token text; a text listed twice is left out (its tokens fall into the rest)."""
    counts = Counter(text for text, _ in top)
    return {text: math.exp(logprob) for text, logprob in top if counts[text] == 1}


def bucket_kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(P || Q) in nats over the given buckets plus one bucket for the rest of each distribution."""
    total = 0.0
    for a, b in zip([*p, 1.0 - sum(p)], [*q, 1.0 - sum(q)]):
        if a > 0:
            total += a * math.log(a / max(b, 1e-12))
    return max(total, 0.0)


def approximate_kls(before: Sequence[dict[str, float] | None], after: Sequence[Top | None]
                    ) -> tuple[torch.Tensor, list[float]]:
    """Per-prompt bucket KLs (NaN where a side has no log-probs) and the share of the endpoint's
    probability that fell into matched buckets."""
    kls, matched = [], []
    for p_all, top in zip(before, after):
        if p_all is None or top is None:
            kls.append(math.nan)
            continue
        q_all = text_probs(top)
        common = sorted(p_all.keys() & q_all.keys())
        q = [q_all[t] for t in common]
        kls.append(bucket_kl([p_all[t] for t in common], q))
        matched.append(sum(q))
    return torch.tensor(kls, dtype=torch.float64), matched


def local_probs(baseline: Baseline, group: str, tops: Sequence[Top | None], ids: dict[str, int]
                ) -> list[dict[str, float] | None]:
    """The local model's first-token probability of each endpoint top-k text that is one local token."""
    logp = torch.log_softmax(baseline.logits(group).double(), dim=-1)
    return [None if top is None else {t: float(logp[i, ids[t]].exp()) for t, _ in top if t in ids}
            for i, top in enumerate(tops)]


def single_token_texts(tokenizer: Any) -> dict[str, int]:
    """Decoded text -> id, for the texts exactly one token decodes to."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    counts = Counter(texts)
    return {text: i for i, text in enumerate(texts) if counts[text] == 1}


def _kls(after: EndpointMeasurer, before: EndpointMeasurer | Baseline, groups: Sequence[str]
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-prompt KLs of the borderline and ordinary groups, and how they were measured."""
    texted = [g for g in ("borderline", "ordinary") if g in groups]
    kls: dict[str, torch.Tensor] = {}
    matched: list[float] = []
    ids: dict[str, int] | None = None
    for group in texted:
        tops = after.tops[group]
        if isinstance(before, EndpointMeasurer):
            probs = [None if t is None else text_probs(t) for t in before.tops[group]]
        elif any(t is not None for t in tops):
            ids = ids or single_token_texts(before.loaded.tokenizer)
            probs = local_probs(before, group, tops, ids)
        else:
            probs = [None] * len(tops)
        kls[group], shares = approximate_kls(probs, tops)
        matched += shares
    if matched:
        returned = [len(t) for g in texted for t in after.tops[g] if t is not None]
        return kls, {"kind": "approximate", "top_k": after.endpoint.top_logprobs, "returned_k_min": min(returned),
                     "matched_mass": sum(matched) / len(matched),
                     "prompts": {g: int((~kl.isnan()).sum()) for g, kl in kls.items()}, "how": APPROXIMATION}
    if not texted:
        return kls, {"kind": "unavailable", "note": "KL is measured on the borderline and ordinary groups; neither "
                                                    "was evaluated."}
    return kls, {"kind": "unavailable", "note": _unavailable(after, before)}


def _unavailable(after: EndpointMeasurer, before: EndpointMeasurer | Baseline) -> str:
    sides = [m for m in (after, before) if isinstance(m, EndpointMeasurer)]
    reasons = [f"{m.chat.name} rejected the request for them ({m.chat.refused.rstrip('.')})" for m in sides
               if m.chat.refused]
    if not reasons:
        reasons = ["--endpoint-top-logprobs is 0" if after.endpoint.top_logprobs == 0 else
                   "no reply carried top_logprobs for the first answer token"]
    return (f"{KL_UNAVAILABLE}: {'; '.join(reasons)}. Servers that return them include vLLM and llama.cpp's "
            "server; refusals, over-refusal and capability are measured all the same.")


def evaluate_endpoint(endpoint: EndpointSettings, settings: EvaluationSettings | None = None, *,
                      reference: LoadedModel | None = None, baseline: EndpointSettings | None = None,
                      judge: Judge | None = None, progress: bool = True) -> EvaluationResult:
    """The model at ``endpoint`` in the four groups, against one before side: ``reference`` (a local
    model, e.g. the unmodified one) or ``baseline`` (another endpoint, e.g. the base model served)."""
    from ..judge import load_judge

    started = time.perf_counter()
    settings = settings or EvaluationSettings()
    settings.validate()
    judge = judge or load_judge("markers")
    sets = load_group_sets(settings)
    before: EndpointMeasurer | Baseline
    if baseline is not None and reference is None:
        before = EndpointMeasurer(baseline, sets, settings, judge)
    elif reference is not None and baseline is None:
        before = Baseline(reference, sets, settings, judge)
    else:
        raise UserError("Compare an endpoint with one before side: a local model (--model) or another endpoint "
                        "(--baseline-endpoint).")
    after = EndpointMeasurer(endpoint, sets, settings, judge)
    bar = _bar(2 * sum(len(getattr(sets, g)) for g in settings.groups), progress)
    after_side = after.side(bar)  # first: a server that is down fails the run before any local work
    before_side = before.side(bar)
    bar.close()
    kls, method = _kls(after, before, settings.groups)
    results = compare(before_side, after_side, kls.get("borderline"), kls.get("ordinary"), judge.name,
                      settings.groups)
    compared = before.chat.name if isinstance(before, EndpointMeasurer) else f"local:{before.loaded.info.name}"
    config = {"mode": "none", "scale": 0.0, "endpoint": after.chat.base, "endpoint_model": after.chat.model,
              "compared_with": compared}
    return EvaluationResult(model=after.chat.name, config=config, judge=judge.name, **results,
                            seconds=round(time.perf_counter() - started, 2),
                            settings={**asdict(settings), "endpoint": asdict(endpoint),
                                      "baseline_endpoint": asdict(baseline) if baseline else None},
                            kl_method=method)

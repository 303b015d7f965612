"""An OpenAI-compatible chat endpoint as judge, for users with a stronger model than fits locally.

Each pair is one chat request for a single token at temperature 0. When the server returns
``top_logprobs`` the label is the most probable of the three letters among them and the confidence
its share of their probability, as for a local model; a server without logprobs (it rejects or
ignores the field) gives the strict parse of the one returned letter, with confidence 1.0. Requests
run on a small thread pool; the client (``alignment_artifacts.endpoint``) retries transient failures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..cache import stable_hash
from ..endpoint import EndpointError, HttpSettings, api_key_from_env, base_url, listed_model, request_json
from .base import LABELS, VERDICT_FORMAT, Verdict, cached_verdicts
from .rubric import ANSWER_BUDGET, LETTERS, PROMPT_BUDGET, RUBRIC_VERSION, cut_chars, judge_message

TOP_LOGPROBS = 5


class EndpointJudge:
    def __init__(self, url: str, model_name: str | None = None, batch_size: int = 16, concurrency: int = 4,
                 http: HttpSettings | None = None):
        self.base, self.batch_size, self.http = base_url(url), batch_size, http or HttpSettings()
        self.concurrency = max(1, concurrency)
        self.api_key = api_key_from_env()
        self.model_name = model_name or listed_model(self.base, self.http, self.api_key)
        self.url = f"{self.base}/chat/completions"
        self.name = f"endpoint:{self.base}#{self.model_name}"
        self.key = stable_hash({"judge": "endpoint", "url": self.base, "model": self.model_name,
                                "rubric": RUBRIC_VERSION, "format": VERDICT_FORMAT})
        self.logprobs = True  # cleared when the server rejects the field

    def judge(self, prompts: Sequence[str], answers: Sequence[str], progress: Any = None) -> list[Verdict]:
        return cached_verdicts(self.key, prompts, answers, self.judge_batch, self.batch_size, progress)

    def judge_batch(self, prompts: list[str], answers: list[str]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self.judge_one, prompts, answers))

    def judge_one(self, prompt: str, answer: str) -> Verdict:
        message = judge_message(cut_chars(prompt, PROMPT_BUDGET), cut_chars(answer, ANSWER_BUDGET))
        body: dict[str, Any] = {"model": self.model_name, "messages": [{"role": "user", "content": message}],
                                "max_tokens": 1, "temperature": 0}
        if self.logprobs:
            try:
                return self._verdict(self._post({**body, "logprobs": True, "top_logprobs": TOP_LOGPROBS}))
            except EndpointError as exc:
                if exc.status not in (400, 422):
                    raise
                self.logprobs = False
        return self._verdict(self._post(body))

    def _post(self, body: dict[str, Any]) -> Any:
        return request_json(self.url, body, settings=self.http, api_key=self.api_key)

    def _verdict(self, reply: Any) -> Verdict:
        try:
            choice = reply["choices"][0]
            content = (choice.get("message") or {}).get("content") or ""
            top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            scores = letter_scores(top)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise EndpointError(f"{self.url} answered JSON that is not a chat completion (no choices[0].message). "
                                "Check that --judge-url points at an OpenAI-compatible /v1 API.") from None
        if scores:
            best = max(scores, key=lambda letter: scores[letter])
            shares = [math.exp(scores[letter] - scores[best]) if letter in scores else 0.0 for letter in LETTERS]
            total = sum(shares)
            return Verdict(LABELS[LETTERS.index(best)], 1.0 / total,
                           (shares[0] / total, shares[1] / total, shares[2] / total))
        if content.strip() in LETTERS:
            return Verdict(LABELS[LETTERS.index(content.strip())], 1.0)
        raise EndpointError(f"The judge model {self.model_name} at {self.base} answered {content[:40]!r}, not one of "
                            f"the letters {', '.join(LETTERS)}. Use a model that follows instructions (an instruct "
                            "or chat model) with --judge-model.")


def letter_scores(top_logprobs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Log-probability per label letter among the returned alternatives (forms with spaces merged)."""
    scores: dict[str, float] = {}
    for entry in top_logprobs:
        letter, logprob = str(entry["token"]).strip(), float(entry["logprob"])
        if letter in LETTERS:
            old = scores.get(letter)
            scores[letter] = logprob if old is None else max(old, logprob) + math.log1p(math.exp(-abs(old - logprob)))
    return scores

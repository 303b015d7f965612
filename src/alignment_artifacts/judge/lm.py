"""A local causal LM as judge: the label is read from its logits over the three label letters.

One batched forward pass per batch (``generation.next_token_logits``, which computes the rubric's
shared prefix once and reuses its KV cache), no generation and no text parsing. The confidence is
the softmax over the three labels, each label's mass being that of its letter with and without a
leading space (whichever of them is a single token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..cache import stable_hash
from ..errors import UserError
from ..models.chat import format_chat
from ..models.generation import next_token_logits
from ..models.loading import LoadedModel, parameters_as, screening_dtype
from .base import LABELS, VERDICT_FORMAT, Verdict, cached_verdicts
from .rubric import ANSWER_BUDGET, CUT, LETTERS, PROMPT_BUDGET, RUBRIC_VERSION, judge_message


def label_token_ids(tokenizer: Any, judge_name: str) -> list[list[int]]:
    """Per label, the ids of its letter as a single token (plain and space-prefixed forms)."""
    choices: list[list[int]] = []
    problems: list[str] = []
    for letter in LETTERS:
        forms = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in (letter, " " + letter)]
        single = sorted({ids[0] for ids in forms if len(ids) == 1})
        if not single:
            problems.append(f"'{letter}' -> {len(forms[0])} tokens")
        choices.append(single)
    flat = [i for ids in choices for i in ids]
    if problems or len(flat) != len(set(flat)):
        raise UserError(f"The judge {judge_name} cannot be read from its logits: its tokenizer does not encode each "
                        f"label letter ({', '.join(LETTERS)}) as its own single token "
                        f"({'; '.join(problems) or 'letters share a token'}). Use another judge model (every builtin "
                        "works, e.g. --judge qwen2.5-coder-1.5b-instruct), or serve this model behind an "
                        "OpenAI-compatible server and pass --judge-url.")
    return choices


def verdicts_from_logits(logits: torch.Tensor, choices: Sequence[Sequence[int]]) -> list[Verdict]:
    """The most probable label per row, its probability among the three labels, and all three."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_label = torch.stack([torch.logsumexp(logp[:, list(ids)], dim=-1) for ids in choices], dim=-1)
    probabilities = torch.softmax(per_label, dim=-1)
    confidence, index = probabilities.max(dim=-1)
    return [Verdict(LABELS[i], float(c), (p[0], p[1], p[2]))
            for i, c, p in zip(index.tolist(), confidence.tolist(), probabilities.tolist())]


def cut_tokens(tokenizer: Any, text: str, budget: int) -> str:
    """``text`` cut to its first ``budget`` tokens of ``tokenizer``, the cut marked."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget]) + CUT


def judging_dtype(loaded: LoadedModel, judge_dtype: str) -> tuple[torch.dtype | None, str]:
    """The dtype a local judge runs in (None: the model's own) and its name, part of the judge's cache key."""
    dtype = screening_dtype(loaded, judge_dtype)
    return dtype, str(dtype).removeprefix("torch.") if dtype is not None else loaded.info.dtype


class ModelJudge:
    """Judges with ``loaded`` (which must carry no steering hooks while it judges).

    On CPUs that multiply bfloat16 natively a float32 model judges in bfloat16 (``judge_dtype``
    "auto"; the weights are restored bit-for-bit afterwards): judging is all prefill, about 2.5x
    faster there, and a label read from three letters' probabilities does not need float32. The
    dtype is part of the judge's identity, so calibration measures the judge evaluation uses.
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, judge_dtype: str = "auto"):
        self.loaded, self.batch_size = loaded, batch_size
        self.dtype, dtype = judging_dtype(loaded, judge_dtype)
        self.name = f"model:{loaded.info.name}"
        self.choices = label_token_ids(loaded.tokenizer, self.name)
        self.key = stable_hash({"judge": "model", "weights": loaded.info.weights_hash, "dtype": dtype,
                                "rubric": RUBRIC_VERSION, "format": VERDICT_FORMAT})

    def judge(self, prompts: Sequence[str], answers: Sequence[str], progress: Any = None) -> list[Verdict]:
        with parameters_as(self.loaded, self.dtype):
            return cached_verdicts(self.key, prompts, answers, self.judge_batch, self.batch_size, progress)

    def judge_batch(self, prompts: list[str], answers: list[str]) -> list[Verdict]:
        """One forward pass over the batch, uncached."""
        tokenizer = self.loaded.tokenizer
        texts = [format_chat(tokenizer, judge_message(cut_tokens(tokenizer, p, PROMPT_BUDGET),
                                                      cut_tokens(tokenizer, a, ANSWER_BUDGET)))
                 for p, a in zip(prompts, answers)]
        logits = next_token_logits(self.loaded.model, tokenizer, texts, len(texts), self.loaded.device)
        return verdicts_from_logits(logits, self.choices)

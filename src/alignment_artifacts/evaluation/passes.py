"""The model passes evaluation needs: first-answer-token logits and greedy answers.

Answers live in memory only: callers judge them and keep labels, counts and divergences, never
the text (the content policy: no completions for harmful prompts on disk).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..models.chat import format_chat, stop_token_ids
from ..models.generation import (
    decode_step,
    encode_batch,
    generate_queued,
    next_token_logits,
    output_cache,
    prefill,
    shared_prefix,
)
from ..models.hooks import site_hooks
from ..models.loading import LoadedModel
from ..prompts import PromptSet
from .metrics import has_broad_marker, is_refusal


def chat_texts(loaded: LoadedModel, prompt_set: PromptSet | Sequence[str], system: str | None,
               template_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Prompts rendered with the model's chat template, ready to score or generate from."""
    texts = prompt_set.texts if isinstance(prompt_set, PromptSet) else list(prompt_set)
    return [format_chat(loaded.tokenizer, text, system, template_kwargs=template_kwargs) for text in texts]


def first_logits(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 16, share_prefix: bool = True
                 ) -> torch.Tensor:
    """Next-token logits at the first answer position for chat-formatted texts [n, vocab].

    ``share_prefix`` off: every prompt runs whole, as under a gated steering (which forbids the
    shared prefix itself); an unmodified baseline for such a configuration must take the same path,
    or its KL carries the two paths' rounding difference (about 0.0008 in bfloat16 on the builtin Qwen).
    """
    return next_token_logits(loaded.model, loaded.tokenizer, texts, batch_size, loaded.device,
                             share_prefix=share_prefix)


class _Reached(Exception):
    """Ends a pass once the highest layer asked for has been read."""


@torch.no_grad()
def last_token_states(loaded: LoadedModel, texts: Sequence[str], site: str, layers: Sequence[int],
                      batch_size: int = 16, progress: Any = None) -> dict[int, torch.Tensor]:
    """The unmodified model's last-token activations at ``site`` of each of ``layers`` for whole
    chat-formatted prompts ({layer: [n, hidden]} float32 on the CPU): what a per-prompt gate decides on,
    read as the gate reads them (whole prompts, no shared prefix). Each pass ends at the highest layer."""
    wanted = sorted(set(layers))
    kept: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less

    def reader(layer: int) -> Callable[[torch.Tensor], None]:
        def read(h: torch.Tensor) -> None:
            kept[layer].append(h[:, -1].float().cpu())
            if layer == wanted[-1]:
                raise _Reached

        return read

    with site_hooks(loaded.adapter, {(site, layer): reader(layer) for layer in wanted}):
        for start in range(0, len(order), batch_size):
            ids, mask = encode_batch(loaded.tokenizer, [texts[i] for i in order[start:start + batch_size]],
                                     loaded.device)
            with contextlib.suppress(_Reached):
                prefill(loaded.model, ids, mask)
            if progress is not None:
                progress.update(len(ids))
    back = torch.tensor(order).argsort()
    hidden = loaded.adapter.hidden_size
    return {layer: (torch.cat(rows) if rows else torch.empty(0, hidden))[back] for layer, rows in kept.items()}


class Answers(NamedTuple):
    """Greedy answers to chat-formatted texts; ``first_logits`` are the first answer position's
    logits, which give the first-token proxy on the very prompts generation judged."""

    texts: list[str]
    ids: list[list[int]]
    first_logits: torch.Tensor


def generate_answers(loaded: LoadedModel, texts: Sequence[str], max_tokens: int | Sequence[int],
                     batch_size: int = 16, progress: Any = None) -> Answers:
    """Greedy answers in the order of ``texts``, ``batch_size`` decoding together, each the one its
    prompt gets alone (``generation.generate_queued``: finished rows leave, the next prompts join);
    the prompts' shared prefix (the chat template's system turn) runs once. ``max_tokens``: one limit,
    or one per text."""
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = shared_prefix(loaded.model, rows, loaded.device)
    ids, first = generate_queued(loaded.model, rows, max_tokens, stops, batch_size, loaded.tokenizer.pad_token_id or 0,
                                 loaded.device, prefix, on_finished=None if progress is None else progress.update)
    return Answers([loaded.tokenizer.decode(row, skip_special_tokens=True) for row in ids], ids, first)


class Generations(NamedTuple):
    """Marker-judged greedy answers (flags only)."""

    flags: list[bool]
    broad: list[bool]
    ids: list[list[int]]
    first_logits: torch.Tensor


def generated_refusals(loaded: LoadedModel, texts: Sequence[str], max_tokens: int, batch_size: int = 16,
                       progress: Any = None) -> Generations:
    """Refusal flags by markers, broad-marker flags and generated ids for greedy answers."""
    answers = generate_answers(loaded, texts, max_tokens, batch_size, progress)
    return Generations([is_refusal(t) for t in answers.texts], [has_broad_marker(t) for t in answers.texts],
                       answers.ids, answers.first_logits)


def answer_perplexity(loaded: LoadedModel, texts: Sequence[str], answers: Sequence[list[int]]) -> float:
    """Perplexity of the original model's own answers under the current (possibly steered) model.

    The prompt is a prefill and the answer continues it, as in generation: a per-prompt gate
    decides on the prompt, not on the answer's last token.
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for text, answer in zip(texts, answers):
            if not answer:
                continue
            prompt = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            prompt = prompt.to(loaded.device)
            target = torch.tensor([answer], device=loaded.device)
            mask = torch.ones_like(prompt)
            out = prefill(loaded.model, prompt, mask)
            logits = [out.logits[0, -1:]]
            if len(answer) > 1:
                mask = torch.cat([mask, torch.ones_like(target[:, :-1])], dim=1)
                rest = decode_step(loaded.model, target[:, :-1], mask, output_cache(out), last_only=False)
                logits.append(rest.logits[0])
            total += float(torch.nn.functional.cross_entropy(torch.cat(logits).float(), target[0], reduction="sum"))
            count += len(answer)
    return math.exp(total / max(count, 1))

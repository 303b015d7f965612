"""The model runner: prefill and decode steps, two decode loops built on them, and ``generate``.

``generate_ids`` decodes one batch (sampling, streaming, ``ignore_end_tokens``; finished rows leave
it); ``generate_queued`` decodes many prompts greedily as a queue, new prompts joining the running
batch as others finish (evaluation's answers). Both state their passes through ``prefill`` and
``decode_step``, where a per-prompt gate learns which pass is which.

Chat formatting and context checks are in ``chat``; left-padded batches come from ``prefix.pad_after_prefix``.

The loops are our own rather than ``model.generate`` so that steering hooks, streaming, the
first-answer-token distribution (for KL), ``ignore_end_tokens`` and per-row stopping all work
the same way for every family, with a host synchronisation or two per step (which rows finished).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import UserError
from .chat import check_fits, context_length, fit_prompt, stop_token_ids
from .chat import format_chat as format_chat  # its old home, still imported from here
from .hooks import attached_passes, contiguous_head_input
from .prefix import (
    SharedPrefix,
    common_prefix_length,
    droppable,
    expandable,
    join_rows,
    keep_rows,
    pad_after_prefix,
)
from .thinking import DEFAULT_THINKING_BUDGET, check_mode, thinking_format


@dataclass
class GenerationConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_end_tokens: bool = False  # keep going past end-of-turn (research)
    truncate: bool = False  # fit a prompt longer than the context by dropping its start, instead of refusing it
    thinking: str = "auto"  # reasoning models: auto (the template's default), on or off (models/thinking.py)
    thinking_budget: int = DEFAULT_THINKING_BUDGET  # added to max_tokens when the model thinks first

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1 (got {self.max_tokens}).")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (got {self.temperature}); 0 means greedy.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); 1 disables it.")
        check_mode(self.thinking)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per prompt, without padding or the stop token
    texts: list[str] = field(default_factory=list)
    first_logits: torch.Tensor | None = None  # [batch, vocab] float32 at the first answer position
    prompt_lengths: list[int] = field(default_factory=list)


def encode_batch(tokenizer: Any, texts: Sequence[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask; chat-formatted text already holds special tokens."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return pad_after_prefix(rows, 0, tokenizer.pad_token_id or 0, device)


def _cache_kwarg(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a pass returned (the attribute's name differs between families)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, so padded and unpadded rows see the same positions."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _kwargs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
            position_ids: torch.Tensor | None) -> dict[str, Any]:
    """A pass's arguments: the padding-aware positions and the family's cache keyword."""
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                  position_ids=positions_from_mask(attention_mask)[:, -input_ids.shape[1]:]
                                  if position_ids is None else position_ids)
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    return kwargs


def _call(model: Any, kwargs: dict[str, Any], last_only: bool) -> Any:
    if last_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        with contiguous_head_input(model):
            return model(**kwargs, logits_to_keep=1)
    return model(**kwargs)


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any = None,
            position_ids: torch.Tensor | None = None, last_only: bool = True) -> Any:
    """A pass that starts (left-padded) prompts; ``cache``: a shared prefix they continue.

    Hooks attached with ``hooks.attach_passes`` (a per-prompt gate) are told first and given the
    same pass without a cache to decide on, so they act on every layer of the real one.
    """
    kwargs = _kwargs(model, input_ids, attention_mask, cache, position_ids)
    passes = attached_passes(model)
    if passes is None:
        return _call(model, kwargs, last_only)
    if cache is not None and not passes.allows_prefix_sharing:
        raise UserError("The active steering decides per whole prompt (a gate), so its passes cannot continue a "
                        "prefix computed once for all prompts; run the prompts whole.")
    with passes.prefill(lambda: model(**{**kwargs, "use_cache": False})):
        return _call(model, kwargs, last_only)


def decode_step(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                last_only: bool = True) -> Any:
    """A pass that continues the prompts of the last ``prefill`` (usually by one token each)."""
    passes = attached_passes(model)
    with passes.decode() if passes is not None else contextlib.nullcontext():
        return _call(model, _kwargs(model, input_ids, attention_mask, cache, None), last_only)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return logits
    picked = torch.gather(logits, 1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < config.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                 stop_ids: Sequence[int] = (), on_step: Callable[[torch.Tensor], None] | None = None,
                 pad_id: int = 0, cache: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode up to ``max_tokens``; returns (generated ids [B, T], done-mask per step [B, T], first logits).

    ``cache`` holds tokens before ``input_ids`` (a ``SharedPrefix``'s), which ``attention_mask`` covers too.
    Rows that finished leave the running batch (``droppable``), so a batch whose answers differ in length
    costs what its rows need rather than its longest row times its width; ``on_step`` and the outputs
    still cover every row (finished ones padded).
    """
    config.validate()
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    batch = input_ids.shape[0]
    stops = torch.tensor(list(stop_ids) or [-1], device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    running = torch.arange(batch, device=input_ids.device)  # the batch rows the model still runs, in order
    seen = input_ids
    output = prefill(model, input_ids, attention_mask, cache=cache)
    logits = output.logits[:, -1, :].float()
    first_logits = logits.clone()
    cache = output_cache(output)
    steps: list[torch.Tensor] = []
    alive: list[torch.Tensor] = []
    for step in range(config.max_tokens):
        scored = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        token = torch.full((batch,), pad_id, dtype=torch.long, device=input_ids.device)
        token[running] = sample(scored, config, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        alive.append(~finished)
        steps.append(token)
        if on_step is not None:
            on_step(token)
        if not config.ignore_end_tokens:
            finished = finished | torch.isin(token, stops)
            if step + 1 == config.max_tokens or bool(finished.all()):
                break
            left = ~finished[running]
            if _worth_dropping(left) and droppable(cache):
                kept = left.nonzero().flatten()
                running, seen = running[kept], seen[kept]
                attention_mask = keep_rows(cache, attention_mask, kept)
                passes = attached_passes(model)
                if passes is not None:
                    passes.keep(kept)
        elif step + 1 == config.max_tokens:
            break
        now = token[running]
        seen = torch.cat([seen, now[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], dim=1)
        output = decode_step(model, now[:, None], attention_mask, cache)
        cache = output_cache(output)
        logits = output.logits[:, -1, :].float()
    return torch.stack(steps, 1), torch.stack(alive, 1), first_logits


def _worth_dropping(left: torch.Tensor) -> bool:
    """Drop finished rows once they are an eighth of the running batch: copying the cache costs far
    less than a step, but not nothing."""
    done = int((~left).sum())
    return done > 0 and done * 8 >= len(left)


@torch.no_grad()
def generate_queued(model: Any, rows: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                    stop_ids: Sequence[int], width: int, pad_id: int, device: torch.device | str,
                    prefix: SharedPrefix | None = None, on_finished: Callable[[int], Any] | None = None
                    ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy answers of many prompts (token rows after ``prefix``), at most ``width`` decoding together;
    returns each row's answer ids (without the stop token) and first-token logits [n, vocab] on the CPU.
    ``max_tokens``: one limit for every row, or one per row (so prompts of several kinds share one queue).
    ``on_finished(n)``: n more rows are done (a progress bar's ``update``).

    A row that finishes leaves the running batch, and once a quarter of its places are free the next
    prompts (shortest first) are prefilled and join it, so the batch stays full instead of decoding
    to the longest answer of each static batch: on a CPU a decoding step costs nearly as much for 4
    rows as for 32. Each row's answer is the one it gets alone (tested). Rows join only a plain growing
    cache and no per-prompt gate (whose decisions are per pass): otherwise the next prompts wait until
    the running ones are done. A cache rows cannot leave (``droppable``) keeps them, fed padding, until
    all of them are done.
    """
    if width < 1:
        raise UserError(f"The generation batch size must be at least 1 (got {width}).")
    limits = [max_tokens] * len(rows) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(rows):
        raise ValueError(f"{len(limits)} token limits for {len(rows)} rows")
    prefix = prefix or SharedPrefix()
    queue = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)  # popped from the end
    answers: list[list[int]] = [[] for _ in rows]
    firsts: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    stops, joinable = set(stop_ids), attached_passes(model) is None
    running: list[int] = []
    finished: set[int] = set()  # running rows that are done but stay in a cache they cannot leave
    cache: Any = None
    mask: torch.Tensor | None = None
    pending = torch.empty(0, dtype=torch.long, device=device)  # each running row's next token, not yet fed

    def record(index: int, token: int) -> bool:
        """Add ``token`` to row ``index``'s answer; whether the row is done."""
        if token in stops:
            return True
        answers[index].append(token)
        return len(answers[index]) >= limits[index]

    while queue or running:
        free = width - len(running)
        if queue and (not running or (joinable and expandable(cache) and free * 4 >= width)):
            new = [queue.pop() for _ in range(min(free, len(queue)))]
            ids, new_mask = pad_after_prefix([rows[i] for i in new], prefix.length, pad_id, device)
            output = prefill(model, ids, new_mask, cache=prefix.cache_for(len(new)))
            logits = output.logits[:, -1, :].float()
            for i, row_logits in zip(new, logits.cpu()):
                firsts[i] = row_logits
            cache, mask = join_rows(cache, mask, output_cache(output), new_mask)
            tokens, stepped = logits.argmax(-1), new
            pending, running = torch.cat([pending, tokens]), running + new
        else:
            assert mask is not None
            mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=1)
            output = decode_step(model, pending[:, None], mask, cache)
            cache, pending, stepped = output_cache(output), output.logits[:, -1, :].argmax(-1), running
            tokens = pending
        done = {i for i, token in zip(stepped, tokens.tolist()) if i not in finished and record(i, token)}
        if on_finished is not None and done:
            on_finished(len(done))
        finished |= done
        if finished and (droppable(cache) or finished.issuperset(running)):
            kept = [k for k, i in enumerate(running) if i not in finished]
            running, finished = [running[k] for k in kept], set()
            if running:
                assert mask is not None
                index = torch.tensor(kept, device=pending.device)
                pending, mask = pending[index], keep_rows(cache, mask, index)
                passes = attached_passes(model)
                if passes is not None:
                    passes.keep(index)
            else:
                cache, mask, pending = None, None, pending[:0]
    return answers, torch.stack(firsts) if rows else torch.empty(0)


def trim(ids: torch.Tensor, alive: torch.Tensor, stop_ids: Sequence[int], keep_stop: bool = False) -> list[list[int]]:
    """Per-row generated ids, cut at the first stop token (which is dropped unless keep_stop)."""
    rows: list[list[int]] = []
    stops = set(stop_ids)
    for row_ids, row_alive in zip(ids.tolist(), alive.tolist()):
        row: list[int] = []
        for token, ok in zip(row_ids, row_alive):
            if not ok:
                break
            if token in stops and not keep_stop:
                break
            row.append(token)
        rows.append(row)
    return rows


class TerminalStreamer:
    """Prints one prompt's answer to the terminal as tokens arrive (batch of one)."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], write: Callable[[str], Any] | None = None):
        import sys

        self.tokenizer, self.stop_ids, self.printed = tokenizer, set(stop_ids), ""
        self.ids: list[int] = []
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.done = False

    def __call__(self, token: torch.Tensor) -> None:
        if self.done:
            return
        value = int(token[0])
        if value in self.stop_ids:
            self.done = True
            return
        self.ids.append(value)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a whole multi-byte character
            self.write(text[len(self.printed):])
            self.printed = text


def generate(loaded: Any, prompts: Sequence[str], config: GenerationConfig | None = None, system: str | None = None,
             batch_size: int = 16, stream: bool = False, chat: bool = True,
             write: Callable[[str], Any] | None = None,
             history: Sequence[dict[str, str]] | None = None) -> GenerationOutput:
    """Generate answers for chat prompts (after ``history``, if given), batched with left padding.

    Each prompt plus ``config.max_tokens`` must fit the model's context (see ``fit_prompt``); a
    model that thinks first (``config.thinking``) gets ``config.thinking_budget`` more tokens.
    """
    config = config or GenerationConfig()
    config.validate()
    if not prompts:
        raise UserError("No prompts to generate from.")
    tokenizer, model = loaded.tokenizer, loaded.model
    context = context_length(model)
    if chat:
        thinking = thinking_format(tokenizer, config.thinking, config.thinking_budget)
        config = replace(config, max_tokens=thinking.max_tokens(config.max_tokens))
        texts = [fit_prompt(tokenizer, p, context, config.max_tokens, config.truncate, system, history,
                            thinking.kwargs) for p in prompts]
    else:
        texts = list(prompts)
        check_fits(tokenizer, texts, context, config.max_tokens)
    stops = stop_token_ids(model, tokenizer)
    out = GenerationOutput(tokens=[])
    firsts: list[torch.Tensor] = []
    step = 1 if stream else batch_size
    for start in range(0, len(texts), step):
        chunk = texts[start:start + step]
        ids, mask = encode_batch(tokenizer, chunk, loaded.device)
        streamer = TerminalStreamer(tokenizer, stops, write) if stream else None
        gen, alive, first = generate_ids(model, ids, mask, config, stops, on_step=streamer,
                                         pad_id=tokenizer.pad_token_id or 0)
        rows = trim(gen, alive, stops, keep_stop=config.ignore_end_tokens)
        out.tokens.extend(rows)
        out.prompt_lengths.extend(mask.sum(1).tolist())
        firsts.append(first.cpu())
    out.texts = [tokenizer.decode(row, skip_special_tokens=not config.ignore_end_tokens) for row in out.tokens]
    out.first_logits = torch.cat(firsts)
    return out


@torch.no_grad()
def shared_prefix(model: Any, rows: Sequence[Sequence[int]], device: torch.device | str, min_shared: int = 8,
                  limit: int | None = None, share: bool = True) -> SharedPrefix:
    """The token prefix all ``rows`` share (at most ``limit`` tokens), run once.

    Nothing is shared when it is shorter than ``min_shared``, when the model's cache cannot be
    expanded (sliding-window layers), when ``share`` is off, or under attached passes that forbid it
    (a gate steers a prompt by its last token: ``Passes.allows_prefix_sharing``): this is the one
    place that asks.
    """
    passes = attached_passes(model)
    share = share and (passes is None or passes.allows_prefix_sharing)
    length = common_prefix_length(rows) if len(rows) > 1 and share else 0
    if limit is not None:
        length = min(length, limit)
    if length < min_shared:
        return SharedPrefix()
    prefix = torch.tensor([list(rows[0][:length])], device=device)
    cache = output_cache(prefill(model, prefix, torch.ones_like(prefix)))
    return SharedPrefix(length, cache) if expandable(cache) else SharedPrefix()


@torch.no_grad()
def next_token_logits(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                      device: torch.device | str = "cpu", min_shared: int = 8, share_prefix: bool = True
                      ) -> torch.Tensor:
    """Logits at the first answer position [n, vocab], float32 on the CPU.

    Chat prompts share a long prefix (system prompt, role markers). It is computed once and its
    KV cache reused for every batch, which halves the work of typical evaluation prompts (see
    ``shared_prefix`` for when it is not).
    """
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = shared_prefix(model, rows, device, min_shared, share=share_prefix)
    pad_id = tokenizer.pad_token_id or 0
    results = []
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_after_prefix(rows[start:start + batch_size], prefix.length, pad_id, device)
        out = prefill(model, ids, mask, cache=prefix.cache_for(len(ids)))
        results.append(out.logits[:, -1, :].float().cpu())
    return torch.cat(results)

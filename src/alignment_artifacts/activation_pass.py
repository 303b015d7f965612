"""What a collection records (sites, positions, layers) and the pass that records it: prompts
encoded with the user's text located, run from their shared prefix, each hooked site pooled
on-device as the model runs.

The chat template's tokens before the first user token are the same for every prompt; they are
run once (``generation.shared_prefix``) and each batch continues from their cache. Every recorded
position lies after them (the user's text, the template's suffix, generated tokens), so the
records equal a full forward's to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UserError, closest
from .models.adapter import SITES
from .models.chat import context_error, format_chat
from .models.generation import GenerationConfig, generate_ids, pad_after_prefix, shared_prefix
from .models.loading import LoadedModel
from .models.prefix import SharedPrefix
from .models.thinking import think_end_index

POSITIONS = ("last", "post_instruction", "mean", "first_generated", "post_think")
ACTIVATION_FILTERS = {  # the original study's --activation-filter names
    "mlp.output": "mlp_out", "mlp": "mlp_out", "attention": "attn_out", "attn": "attn_out",
    "attention.output": "attn_out", "residual": "resid_post", "resid": "resid_post", "block": "resid_post",
    "resid_pre": "resid_pre", "resid_post": "resid_post", "mlp_out": "mlp_out", "attn_out": "attn_out",
}


def parse_sites(spec: str | Sequence[str] | None) -> list[str]:
    """Canonical sites from names or the original study's filter syntax ("mlp.output,attention", "all")."""
    if spec is None:
        return ["mlp_out"]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["all"]:
        return list(SITES)
    sites: list[str] = []
    for item in items:
        if item not in ACTIVATION_FILTERS:
            raise UserError(f"Unknown site '{item}'.{closest(item, ACTIVATION_FILTERS)} Valid sites: "
                            f"{', '.join(SITES)}, or 'all' (aliases: {', '.join(sorted(ACTIVATION_FILTERS))}).")
        if ACTIVATION_FILTERS[item] not in sites:
            sites.append(ACTIVATION_FILTERS[item])
    return sites


def parse_positions(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return ["last"]
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for item in items:
        if item.startswith("generated:"):
            count = item.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise UserError(f"Position '{item}' needs a positive number of steps, e.g. generated:20.")
        elif item not in POSITIONS:
            raise UserError(f"Unknown position '{item}'.{closest(item, POSITIONS)} Valid positions: "
                            f"{', '.join(POSITIONS)}, generated:N.")
    return items


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layers from "1,2,5", "0-7", "all" or a list; 0-based decoder block indices."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        layers: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-")[0], "")
                    layers.extend(range(int(lo), int(hi) + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise UserError(f"Could not read layers '{spec}'. Use a list like 1,2,3, a range like 4-10, "
                                f"or 'all' (0-based, this model has layers 0-{n_layers - 1}).") from None
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise UserError(f"Layer(s) {bad} are out of range: this model has {n_layers} decoder blocks, numbered "
                        f"0 to {n_layers - 1}.")
    return sorted(set(layers))


@dataclass
class CollectionPlan:
    sites: list[str]
    positions: list[str]
    layers: list[int]
    store_dtype: str
    system: str | None
    batch_size: int | str
    max_length: int | None
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. the thinking switch

    @property
    def generated_steps(self) -> int:
        return max([int(p.split(":")[1]) for p in self.positions if p.startswith("generated:")], default=0)


@dataclass
class EncodedPrompt:
    ids: list[int]
    user_start: int  # first token of the user's text
    user_end: int  # one past its last token; tokens from here on are the template's suffix
    think_end: int | None = None  # first position after a thinking block closes in the template's suffix


def encode_prompt(tokenizer: Any, text: str, system: str | None, max_length: int | None,
                  truncate: bool = False, reserved: int = 0, template_kwargs: dict[str, Any] | None = None
                  ) -> EncodedPrompt:
    """Tokenize a chat-formatted prompt and find where the user's text sits in it.

    A prompt longer than ``max_length - reserved`` tokens is refused, unless ``truncate``: then
    tokens are dropped from the start of the user's text.
    """
    formatted = format_chat(tokenizer, text, system, template_kwargs=template_kwargs)
    start_char = formatted.rfind(text)
    end_char = start_char + len(text)
    enc = tokenizer(formatted, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    user = [i for i, (s, _e) in enumerate(offsets) if start_char <= s < end_char]
    if not user:
        user = [len(ids) - 1]
    encoded = EncodedPrompt(ids=list(ids), user_start=user[0], user_end=user[-1] + 1,
                            think_end=think_end_index(formatted, offsets, end_char))
    if max_length and len(ids) + reserved > max_length:
        if not truncate:
            raise context_error(len(ids), max_length, reserved, fix=f"Shorten it, or pass --truncate (truncate=True "
                                f"in the API) to drop tokens from the start of the user's text. It begins: "
                                f"{text[:60]!r}", which="A prompt")
        drop = len(ids) + reserved - max_length
        if drop >= encoded.user_end - encoded.user_start:
            raise UserError(f"A prompt's chat template alone is longer than the model's context ({max_length} "
                            "tokens); shorten the system prompt.")
        warnings.warn(f"Prompt of {len(ids)} tokens exceeds the model's context ({max_length}); dropped {drop} "
                      "tokens from the start of the user's text.", stacklevel=2)
        cut = encoded.user_start
        think = encoded.think_end - drop if encoded.think_end is not None else None
        encoded = EncodedPrompt(ids=ids[:cut] + ids[cut + drop:], user_start=cut, user_end=encoded.user_end - drop,
                                think_end=think)
    return encoded


class Recorder:
    """Hook bodies that pool each site's hidden states on-device as the forward pass runs.

    A prefill's records replace any earlier prefill's of the batch (a gate's decision pass runs
    the prompt once before the real pass); decoding steps, announced by ``step``, append.
    """

    def __init__(self, plan: CollectionPlan, dtype: torch.dtype):
        self.plan, self.dtype = plan, dtype
        self.out: dict[tuple[str, int, str], list[torch.Tensor]] = {}
        self.by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.decoding = False

    def start_batch(self, user_start: torch.Tensor, user_end: torch.Tensor, length: int, pad: torch.Tensor,
                    think_end: torch.Tensor) -> None:
        """Positions are those of the padded ``length`` tokens the hooks see (after any shared prefix)."""
        rows = torch.arange(len(pad), device=pad.device)
        self.rows = rows
        self.last = pad + user_end - 1
        positions = torch.arange(length, device=pad.device)[None, :]
        span = (positions >= (pad + user_start)[:, None]) & (positions < (pad + user_end)[:, None])
        self.mean_weights = span.float() / span.sum(1, keepdim=True).clamp_min(1).float()
        suffix = int((length - (pad + user_end)).min())
        self.post = (length - suffix + torch.arange(suffix, device=pad.device))[None, :].expand(len(pad), -1)
        self.by_device = {pad.device: (self.rows, self.last, self.mean_weights, self.post, pad + think_end)}
        self.out = {}
        self.decoding = False

    def step(self, _token: torch.Tensor) -> None:
        """A token was chosen: the passes that follow decode it."""
        self.decoding = True

    def indices(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """This batch's position indices on ``device`` (a dispatched model's layers run on several), copied once."""
        if device not in self.by_device:
            self.by_device[device] = tuple(t.to(device) for t in self.by_device[self.rows.device])
        return self.by_device[device]

    def hook(self, site: str, layer: int):
        def fn(h: torch.Tensor) -> None:
            if self.decoding:
                for position in self.plan.positions:
                    if position.startswith("generated:"):
                        self.out[(site, layer, position)].append(h[:, -1].to(self.dtype, copy=True))
                return None
            rows, last, mean_weights, post, think = self.indices(h.device)
            for position in self.plan.positions:
                if position == "last":
                    value = h[rows, last]
                elif position == "mean":
                    value = torch.einsum("bl,blh->bh", mean_weights, h.float())
                elif position == "post_instruction":
                    value = h[rows[:, None], post]
                elif position == "post_think":
                    value = h[rows, think]
                else:  # first_generated, and generated:N's first step: the position that produces the first token
                    value = h[:, -1]
                self.out[(site, layer, position)] = [value.to(self.dtype, copy=True)]
            return None

        return fn

    def result(self) -> dict[tuple[str, int, str], torch.Tensor]:
        merged = {}
        for key, values in self.out.items():
            if key[2].startswith("generated:"):
                steps = int(key[2].split(":")[1])
                merged[key] = torch.stack(values[:steps], 1).cpu()
            else:
                merged[key] = values[0].cpu()
        return merged


def collection_prefix(loaded: LoadedModel, encoded: list[EncodedPrompt]) -> SharedPrefix:
    """The template tokens before every prompt's user text, run once (no recording hooks needed)."""
    return shared_prefix(loaded.model, [e.ids for e in encoded], loaded.device,
                         limit=min(e.user_start for e in encoded))


def run_batch(loaded: LoadedModel, recorder: Recorder, encoded: list[EncodedPrompt], plan: CollectionPlan,
              prefix: SharedPrefix) -> dict[tuple[str, int, str], torch.Tensor]:
    """Run one batch after ``prefix`` (and decode greedily for generated:N) with ``recorder``'s hooks installed."""
    device, shared = loaded.device, prefix.length
    ids, mask = pad_after_prefix([e.ids for e in encoded], shared, loaded.tokenizer.pad_token_id or 0, device)
    length = ids.shape[1]
    pad = torch.tensor([length - (len(e.ids) - shared) for e in encoded], device=device)
    recorder.start_batch(torch.tensor([e.user_start - shared for e in encoded], device=device),
                         torch.tensor([e.user_end - shared for e in encoded], device=device), length, pad,
                         torch.tensor([(len(e.ids) - 1 if e.think_end is None else e.think_end) - shared
                                       for e in encoded], device=device))
    config = GenerationConfig(max_tokens=max(1, plan.generated_steps), ignore_end_tokens=True)
    generate_ids(loaded.model, ids, mask, config, on_step=recorder.step, cache=prefix.cache_for(len(encoded)))
    return recorder.result()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_with_backoff(loaded: LoadedModel, recorder: Recorder, encoded: list[EncodedPrompt], plan: CollectionPlan,
                     prefix: SharedPrefix) -> dict[tuple[str, int, str], torch.Tensor]:
    """Run one batch; on out-of-memory split it in halves (results are concatenated in order)."""
    try:
        return run_batch(loaded, recorder, encoded, plan, prefix)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not _is_oom(exc) or len(encoded) == 1:
            raise
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(encoded) // 2
        first = run_with_backoff(loaded, recorder, encoded[:half], plan, prefix)
        second = run_with_backoff(loaded, recorder, encoded[half:], plan, prefix)
        return {k: _cat_padded(first[k], second[k]) for k in first}


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() == 3 and a.shape[1] != b.shape[1]:  # post_instruction suffix lengths can differ
        keep = min(a.shape[1], b.shape[1])
        a, b = a[:, -keep:], b[:, -keep:]
    return torch.cat([a, b])

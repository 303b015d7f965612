"""Site hooks installed by a context manager that always removes them.

A site function receives the site's hidden states ``[batch, seq, hidden]`` and returns either
None (observe only) or a replacement tensor of the same shape. ``resid_pre`` is a forward
pre-hook on the block; the other sites are forward hooks on the module the adapter names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .adapter import ModelAdapter, first_tensor

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]

_prefix_sharing = contextvars.ContextVar("prefix_sharing", default=True)


@contextlib.contextmanager
def whole_prompts() -> Iterator[None]:
    """Within the block, prompt passes do not reuse a shared prefix's KV cache.

    Needed when hooks treat a position by what comes later in the prompt (a per-prompt gate
    decided at the last token): a prefix computed once for every prompt cannot know that.
    """
    token = _prefix_sharing.set(False)
    try:
        yield
    finally:
        _prefix_sharing.reset(token)


def prefix_sharing() -> bool:
    return _prefix_sharing.get()


DecisionPass = Callable[[Callable[[], Any]], None]
_decision_pass: contextvars.ContextVar[DecisionPass | None] = contextvars.ContextVar("decision_pass", default=None)


@contextlib.contextmanager
def decision_passes(run: DecisionPass) -> Iterator[None]:
    """Within the block, each prefill through ``generation.forward`` first calls ``run(pass)``, where
    ``pass`` runs the same forward without a cache: hooks that decide per prompt (a gate) see the
    whole prompt before the real pass steers any layer of it."""
    token = _decision_pass.set(run)
    try:
        yield
    finally:
        _decision_pass.reset(token)


def decision_pass() -> DecisionPass | None:
    return _decision_pass.get()


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def _pre_hook(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(fn: SiteFn, scale: float = 1.0) -> Callable[..., Any]:
    """``scale``: what the block multiplies the module's output by before the residual add (Granite),
    so that ``fn`` sees and edits the contribution itself."""
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        h = first_tensor(output)
        seen = h if scale == 1.0 else h * scale
        new = fn(seen)
        if new is None or new is seen:
            return None
        return _replace_first(output, new if scale == 1.0 else new / scale)

    return hook


@contextlib.contextmanager
def site_hooks(adapter: ModelAdapter, hooks: Mapping[tuple[str, int], SiteFn]) -> Iterator[None]:
    """Install ``{(site, layer): fn}`` for the duration of the block, removing them on any exit."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for (site, layer), fn in hooks.items():
            module = adapter.site_module(site, layer)
            if site == "resid_pre":
                handles.append(module.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(fn, adapter.site_scale(site))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _contiguous_first(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output head a contiguous input for the block.

    ``logits_to_keep`` gives the head a strided slice of the hidden states; PyTorch's CPU
    ``linear`` then copies the whole vocabulary matrix per row (measured on Qwen2.5-1.5B: 32 s
    instead of 0.05 s per batch in bfloat16, 2x slower in float32). A copy of the few kept rows
    avoids that on every device.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_first)
    try:
        yield
    finally:
        handle.remove()

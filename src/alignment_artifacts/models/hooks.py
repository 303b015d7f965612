"""Site hooks installed by a context manager that always removes them.

A site function receives the site's hidden states ``[batch, seq, hidden]`` and returns either
None (observe only) or a replacement tensor of the same shape. ``resid_pre`` is a forward
pre-hook on the block, ``attn_in``/``mlp_in`` pre-hooks on the norm (or sublayer) that attention and
the MLP read through; the other sites are forward hooks on the module the adapter names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from ..errors import UserError
from .adapter import READ_SITES, ModelAdapter, first_tensor

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]


class Passes(Protocol):
    """What hooks that decide per prompt (a steering gate) need told about each pass of the model.

    The toolkit's runner (``generation.prefill`` / ``decode_step``) states every pass it runs:
    ``prefill(run_unmodified)`` around a pass that starts prompts, where ``run_unmodified`` runs the
    same pass without a cache (to decide before any layer is steered), ``decode()`` around a
    step that continues them, and ``keep(rows)`` when finished rows leave the batch between steps.
    ``allows_prefix_sharing``: may a prompt pass reuse a prefix computed once for all prompts?
    (Not when a position's treatment depends on later tokens.)
    """

    allows_prefix_sharing: bool

    def prefill(self, run_unmodified: Callable[[], Any]) -> contextlib.AbstractContextManager[None]: ...

    def decode(self) -> contextlib.AbstractContextManager[None]: ...

    def keep(self, rows: torch.Tensor) -> None: ...


_PASSES = "_alignment_artifacts_passes"


@contextlib.contextmanager
def attach_passes(model: torch.nn.Module, passes: Passes) -> Iterator[None]:
    """Make ``passes`` the model's for the block, where the runner finds it (``attached_passes``)."""
    if getattr(model, _PASSES, None) is not None:
        raise UserError("Only one per-prompt gate can steer a model at a time; leave the first gated steering "
                        "block before entering another.")
    setattr(model, _PASSES, passes)
    try:
        yield
    finally:
        setattr(model, _PASSES, None)


def attached_passes(model: Any) -> Passes | None:
    return getattr(model, _PASSES, None)


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
            if site == "resid_pre" or site in READ_SITES:
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

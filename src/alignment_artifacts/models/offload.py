"""Models dispatched by accelerate (``device_map``, CPU and disk offload): where things run and live.

accelerate wraps each dispatched module's ``forward`` so that it moves its inputs to the module's
*execution device* (``module._hf_hook.execution_device``) and, for offloaded modules, loads the
weights there from ``_hf_hook.weights_map`` for the call only: between calls such parameters sit
on the ``meta`` device. So the device of a module's parameters says nothing about where it runs,
and editing an offloaded weight means editing what its hook loads from.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .adapter import ModelAdapter
from .hooks import SiteFn


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def execution_device(*modules: nn.Module) -> torch.device:
    """Where the first of ``modules`` with a known place computes: its accelerate hook's execution
    device, else its first real parameter's (CPU if none of them has either)."""
    for module in modules:
        device = _hook_device(module)
        if device is not None:
            return device
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def site_device(adapter: ModelAdapter, site: str, layer: int) -> torch.device:
    """Where a hook at (site, layer) receives its hidden states.

    A forward hook sees the module's output, on its execution device. A ``resid_pre`` pre-hook
    runs before accelerate moves the block's inputs, so it sees them where the previous block (or,
    at layer 0, the embeddings) left them.
    """
    embeddings = adapter.model.get_input_embeddings()
    if site != "resid_pre":
        return execution_device(adapter.site_module(site, layer), adapter.block(layer), embeddings)
    if layer == 0:
        return execution_device(embeddings)
    return execution_device(adapter.block(layer - 1), embeddings)


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
            if t is not None}


@contextlib.contextmanager
def editable(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s own offloaded weights are real CPU tensors that may be edited in place.

    On exit the (edited) tensors become what the module's hook loads from, and the parameters go
    back to ``meta``, so forward passes and ``save_pretrained`` both see the edit. A module that is
    not offloaded is left as it is.
    """
    offloaded = [name for name, t in _own_tensors(module).items() if t.device.type == "meta"]
    if not offloaded:
        yield
        return
    hook: Any = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise UserError(f"{type(module).__name__} is offloaded by a hook on an enclosing module, a layout this "
                        "export cannot edit. Load the model without disk offload (or with a device_map that "
                        "dispatches whole decoder blocks) and export again.")
    from accelerate.utils import set_module_tensor_to_device

    for name in offloaded:
        set_module_tensor_to_device(module, name, "cpu", value=weights[name].detach().to("cpu", copy=True))
    try:
        yield
    finally:
        own = _own_tensors(module)
        hook.weights_map = {name: own[name].detach() for name in offloaded}
        for name in offloaded:
            set_module_tensor_to_device(module, name, "meta")


def offloaded_value(model: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the parameter ``name`` of ``model``), read from its hook's weights when it is offloaded."""
    if tensor.device.type != "meta":
        return tensor
    from transformers.integrations.accelerate import load_offloaded_parameter

    return load_offloaded_parameter(model, name)


def per_device(build: Callable[[torch.device], SiteFn], device: torch.device) -> SiteFn:
    """A site function built for ``device`` up front and for any other device its input arrives on
    once, on first use: directions reach each layer's execution device once, never per call."""
    built = {device: build(device)}

    def fn(h: torch.Tensor) -> torch.Tensor | None:
        site_fn = built.get(h.device)
        if site_fn is None:
            site_fn = built[h.device] = build(h.device)
        return site_fn(h)

    return fn

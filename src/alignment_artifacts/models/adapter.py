"""The architecture adapter: the one place that knows where each model family keeps things.

Everything else (collection, steering, export) asks the adapter for "the decoder blocks",
"the module whose output is the attention contribution to the residual stream", or "the
matrices that write into the residual stream", and never special-cases a family itself.

To add a family, add one ``ArchitectureSpec`` row to ``ARCHITECTURES``: dotted paths are
relative to the ``*ForCausalLM`` model (for ``blocks``, ``embeddings``) or to one decoder
block (everything else). ``tests/test_adapter.py`` builds a tiny random model of every family
and checks the resolved sites against ``output_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class ArchitectureSpec:
    model_types: tuple[str, ...]
    blocks: str  # list of decoder blocks, from the CausalLM model
    embeddings: tuple[str, ...]  # modules whose weights write straight into the residual stream
    attn_out: str  # module (in a block) whose output is attention's contribution to the residual
    mlp_out: str  # module (in a block) whose output is the MLP's contribution to the residual
    attn_proj: str  # linear that produces attention's output (o_proj or equivalent)
    mlp_proj: str  # linear that produces the MLP's output (down_proj or equivalent)
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out] instead of [out, in]
    # A norm applied after the projection and before the residual add (Gemma 2/3). Baking a
    # direction into the projection is then only approximate; export says so.
    post_norms: tuple[str, ...] = ()
    expert_projs: tuple[str, ...] = ()  # MoE expert output projections, when present


_LLAMA_LIKE: dict[str, Any] = dict(blocks="model.layers", embeddings=("model.embed_tokens",), attn_out="self_attn",
                   mlp_out="mlp", attn_proj="self_attn.o_proj", mlp_proj="mlp.down_proj")

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), **_LLAMA_LIKE),
    ArchitectureSpec(model_types=("gemma2", "gemma3_text", "gemma3"), blocks="model.layers",
                     embeddings=("model.embed_tokens",), attn_out="post_attention_layernorm",
                     mlp_out="post_feedforward_layernorm", attn_proj="self_attn.o_proj",
                     mlp_proj="mlp.down_proj",
                     post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    ArchitectureSpec(model_types=("gpt2",), blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
                     attn_out="attn", mlp_out="mlp", attn_proj="attn.c_proj", mlp_proj="mlp.c_proj", conv1d=True),
    ArchitectureSpec(model_types=("gpt_neox",), blocks="gpt_neox.layers", embeddings=("gpt_neox.embed_in",),
                     attn_out="attention", mlp_out="mlp", attn_proj="attention.dense",
                     mlp_proj="mlp.dense_4h_to_h"),
)

SUPPORTED_MODEL_TYPES = tuple(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for(model_type: str) -> ArchitectureSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"Model architecture '{model_type}' is not supported yet. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "To add it, append an ArchitectureSpec row to ARCHITECTURES in "
        "src/alignment_artifacts/models/adapter.py naming where that family keeps its decoder blocks, "
        "attention and MLP output modules and projections, then add its tiny config to tests/test_adapter.py.")


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def first_tensor(output: object) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden states."""
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


class ModelAdapter:
    """Resolves canonical sites and residual-writing weights for one loaded model."""

    def __init__(self, model: Any):
        config: Any = model.config
        self.model: Any = model
        self.model_type: str = config.model_type
        self.spec = spec_for(self.model_type)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size: int = int(text_config.hidden_size)
        self.blocks: nn.ModuleList = get_submodule(model, self.spec.blocks)  # type: ignore[assignment]
        self.n_layers: int = len(self.blocks)

    def block(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return self.blocks[layer]

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise UserError(f"Layer {layer} is out of range: this model has {self.n_layers} decoder blocks, "
                            f"numbered 0 to {self.n_layers - 1}.")

    def site_module(self, site: str, layer: int) -> nn.Module:
        """The module to hook for a site: a forward pre-hook for resid_pre, a forward hook otherwise."""
        block = self.block(layer)
        if site in ("resid_pre", "resid_post"):
            return block
        if site == "attn_out":
            return get_submodule(block, self.spec.attn_out)
        if site == "mlp_out":
            return get_submodule(block, self.spec.mlp_out)
        raise UserError(f"Unknown site '{site}'. Valid sites: {', '.join(SITES)}.")

    def output_projections(self, layer: int) -> list[nn.Module]:
        """Linear layers of block ``layer`` whose outputs are added to the residual stream."""
        block = self.block(layer)
        projs = [get_submodule(block, self.spec.attn_proj), get_submodule(block, self.spec.mlp_proj)]
        for dotted in self.spec.expert_projs:
            projs.append(get_submodule(block, dotted))
        return projs

    def embedding_modules(self) -> list[nn.Module]:
        return [get_submodule(self.model, dotted) for dotted in self.spec.embeddings]

    def residual_writers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) for every module that writes into the residual stream."""
        for dotted in self.spec.embeddings:
            yield dotted, get_submodule(self.model, dotted)
        for layer in range(self.n_layers):
            for dotted in (self.spec.attn_proj, self.spec.mlp_proj, *self.spec.expert_projs):
                yield f"{self.spec.blocks}.{layer}.{dotted}", get_submodule(self.blocks[layer], dotted)

    @property
    def bake_is_exact(self) -> bool:
        """Whether orthogonalising the writers removes a direction exactly (no post-projection norm)."""
        return not self.spec.post_norms

"""The architecture adapter: the one place that knows where each model family keeps things.

Everything else (collection, steering, export) asks the adapter for "the decoder blocks",
"the module whose output is the attention contribution to the residual stream", or "the
tensors that write into the residual stream", and never special-cases a family itself.

To add a family, add one ``ArchitectureSpec`` row to ``ARCHITECTURES``: dotted paths are
relative to the ``*ForCausalLM`` model (for ``blocks``, ``embeddings``) or to one decoder
block (everything else). A mixture-of-experts row names its experts with ``Experts``; the same
row resolves fused ``[experts, ...]`` tensors (transformers 5) and a list of expert modules
(older or remote code). ``tests/test_adapter.py`` builds a tiny random model of every family and
checks the resolved sites against ``output_hidden_states``; ``tests/test_export.py`` checks
that baking into the resolved tensors equals hooking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
READ_SITES = ("attn_in", "mlp_in")  # what attention and the MLP read, before their norms (pre-hooks; steering only)


@dataclass(frozen=True)
class Experts:
    """Where a sparse MoE block keeps what its experts write into the residual stream.

    Routing weights only scale each expert's output, so removing a direction from every expert's
    down projection (and bias, and the shared experts') removes it from the block's output
    exactly. The router is never touched.
    """

    path: str  # in a block: the experts, one fused module or a ModuleList of expert MLPs
    down: str  # fused: the stacked down-projection parameter; a list: each expert's down linear
    transposed: bool = False  # fused down is [experts, inter, hidden] (x @ W), not [experts, hidden, inter]
    bias: str = ""  # fused down-projection bias [experts, hidden]: it writes into the residual stream too
    shared: tuple[str, ...] = ()  # down linears of shared experts (run on every token), in a block

    def describe(self) -> str:
        layout = "[experts, inter, hidden]" if self.transposed else "[experts, hidden, inter]"
        text = f"{self.path}.{self.down} {layout} (or a list of experts, each with a linear {self.down})"
        text += f" + bias {self.path}.{self.bias}" if self.bias else ""
        return text + "".join(f" + shared {s}" for s in self.shared)


@dataclass(frozen=True)
class ArchitectureSpec:
    model_types: tuple[str, ...]
    blocks: str  # list of decoder blocks, from the CausalLM model
    embeddings: tuple[str, ...]  # modules whose weights write straight into the residual stream
    attn_out: str  # module (in a block) whose output is attention's contribution to the residual
    mlp_out: str  # module (in a block) whose output is the MLP's contribution to the residual
    attn_proj: str  # linear that produces attention's output (o_proj or equivalent)
    mlp_proj: str  # linear that produces a dense MLP's output (down_proj or equivalent); "" if all sparse
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out] instead of [out, in]
    # Norms applied after the projections and before the residual add (Gemma 2/3, OLMo 2/3); the
    # attn_out/mlp_out sites are then these norms. Baking cannot match hooks exactly there; export says so.
    post_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0  # the post norms multiply by (norm_offset + weight): Gemma's 1 + w
    experts: Experts | None = None  # sparse MoE blocks; a block without these experts uses mlp_proj
    residual_multiplier: str = ""  # config field scaling attention and MLP outputs before the add (Granite)
    # Modules (in a block) whose input is what attention and the MLP read: their pre-norms, or the sublayers
    # themselves where no norm precedes them; () where one norm feeds both (parallel blocks: no separate reads)
    read_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    note: str = ""  # what is unusual about the family, for `models --families`


@dataclass(frozen=True)
class Writer:
    """A tensor whose values are added into the residual stream; ``axis`` indexes the hidden units."""

    name: str  # dotted parameter name in the model
    tensor: torch.Tensor
    axis: int


_LLAMA_LIKE: dict[str, Any] = dict(blocks="model.layers", embeddings=("model.embed_tokens",), attn_out="self_attn",
                                   mlp_out="mlp", attn_proj="self_attn.o_proj", mlp_proj="mlp.down_proj")
_POST_NORMED: dict[str, Any] = dict(_LLAMA_LIKE, attn_out="post_attention_layernorm",
                                    mlp_out="post_feedforward_layernorm",
                                    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
_PARALLEL = "attention and MLP read the same input and both add to the residual (parallel block)"

ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "exaone", "internlm3"),
                     **_LLAMA_LIKE),
    ArchitectureSpec(model_types=("cohere",), **_LLAMA_LIKE, read_norms=(), note=_PARALLEL),
    ArchitectureSpec(model_types=("granite",), **_LLAMA_LIKE, residual_multiplier="residual_multiplier",
                     note="attention and MLP outputs are scaled by residual_multiplier before the add; the "
                          "attn_out/mlp_out sites are the scaled contributions"),
    ArchitectureSpec(model_types=("starcoder2",), **dict(_LLAMA_LIKE, mlp_proj="mlp.c_proj"),
                     note="biased projections"),
    ArchitectureSpec(model_types=("gemma2", "gemma3_text", "gemma3"), **_POST_NORMED, norm_offset=1.0,
                     read_norms=("input_layernorm", "pre_feedforward_layernorm")),
    ArchitectureSpec(model_types=("olmo2", "olmo3", "exaone4"), **_POST_NORMED, read_norms=("self_attn", "mlp")),
    ArchitectureSpec(model_types=("phi",), **dict(_LLAMA_LIKE, attn_proj="self_attn.dense", mlp_proj="mlp.fc2"),
                     read_norms=(), note=_PARALLEL + "; biased projections"),
    ArchitectureSpec(model_types=("falcon",), blocks="transformer.h", embeddings=("transformer.word_embeddings",),
                     attn_out="self_attention", mlp_out="mlp", attn_proj="self_attention.dense",
                     mlp_proj="mlp.dense_4h_to_h", read_norms=(), note="parallel or sequential block, per config"),
    ArchitectureSpec(model_types=("gpt2",), blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
                     attn_out="attn", mlp_out="mlp", attn_proj="attn.c_proj", mlp_proj="mlp.c_proj", conv1d=True,
                     read_norms=("ln_1", "ln_2")),
    ArchitectureSpec(model_types=("gpt_neox",), blocks="gpt_neox.layers", embeddings=("gpt_neox.embed_in",),
                     attn_out="attention", mlp_out="mlp", attn_proj="attention.dense",
                     mlp_proj="mlp.dense_4h_to_h"),
    # Mixture of experts: the mlp_out site is the whole sparse block's output.
    ArchitectureSpec(model_types=("qwen2_moe",), **_LLAMA_LIKE,
                     experts=Experts("mlp.experts", "down_proj", shared=("mlp.shared_expert.down_proj",)),
                     note="shared expert; layers in mlp_only_layers are dense"),
    ArchitectureSpec(model_types=("qwen3_moe", "olmoe"), **_LLAMA_LIKE, experts=Experts("mlp.experts", "down_proj")),
    ArchitectureSpec(model_types=("mixtral",), **dict(_LLAMA_LIKE, mlp_proj=""),
                     experts=Experts("mlp.experts", "down_proj")),
    ArchitectureSpec(model_types=("gpt_oss",), **dict(_LLAMA_LIKE, mlp_proj=""),
                     experts=Experts("mlp.experts", "down_proj", transposed=True, bias="down_proj_bias"),
                     note="biased attention output and experts"),
)

SUPPORTED_MODEL_TYPES = tuple(t for spec in ARCHITECTURES for t in spec.model_types)

# Families people ask for that the table does not cover, and why (listed by `models --families`).
NOT_SUPPORTED: tuple[tuple[str, str], ...] = (
    ("internlm2, baichuan, chatglm", "only as trust_remote_code checkpoints: no native transformers class"),
    ("jamba, falcon_h1, granitemoehybrid, lfm2, qwen3_next", "hybrid blocks (state-space, convolution or "
     "linear attention) have no attention output module in every block"),
    ("granitemoe, jetmoe, dbrx", "expert layouts not in the table yet (a row with their Experts(...) adds them)"),
    ("multimodal wrappers (llava, qwen2_vl, ...)", "load the text model; only causal LMs are resolved"),
)


def spec_for(model_type: str) -> ArchitectureSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UserError(
        f"Model architecture '{model_type}' is not supported yet. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "To add it, append an ArchitectureSpec row to ARCHITECTURES in "
        "src/alignment_artifacts/models/adapter.py naming where that family keeps its decoder blocks, "
        "attention and MLP output modules and projections, then add its tiny config to tests/tiny_models.py.")


def families() -> list[dict[str, Any]]:
    """One row per supported model type: kind, sites, whether a bake is exact, experts layout, notes."""
    rows = []
    for spec in ARCHITECTURES:
        bake = ("approximate: a norm sits between the projections and the residual stream "
                f"({', '.join(spec.post_norms)})") if spec.post_norms else "exact"
        for model_type in spec.model_types:
            rows.append({"model_type": model_type, "kind": "moe" if spec.experts else "dense", "sites": list(SITES),
                         "bake": bake, "experts": spec.experts.describe() if spec.experts else None,
                         "notes": spec.note})
    return rows


def find_submodule(root: nn.Module, dotted: str) -> Any:
    """The module (or parameter) at ``dotted`` under ``root``, or None where a part is missing."""
    node: Any = root
    for part in dotted.split("."):
        if part.isdigit() and isinstance(node, nn.ModuleList | nn.Sequential):
            node = node[int(part)] if int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def first_tensor(output: object) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden states."""
    return output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]


def _module_writers(root: nn.Module, dotted: str, name: str, conv1d: bool) -> list[Writer]:
    """Weight (and bias) of one module that writes into the residual stream."""
    module: Any = get_submodule(root, dotted)
    if isinstance(module, nn.Embedding) or conv1d:  # rows (Conv1D: [in, hidden]) live in residual space
        axis = 1
    elif isinstance(module, nn.Linear):  # [hidden, in]: columns live in residual space
        axis = 0
    else:
        raise UserError(f"{name} is a {type(module).__name__}; the adapter only knows where nn.Linear, "
                        "nn.Embedding and GPT-2 Conv1D weights keep the hidden units. Add that layout to "
                        "src/alignment_artifacts/models/adapter.py.")
    writers = [Writer(f"{name}.weight", module.weight, axis)]
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        writers.append(Writer(f"{name}.bias", bias, 0))
    return writers


class ModelAdapter:
    """Resolves canonical sites and residual-writing tensors for one loaded model."""

    def __init__(self, model: Any):
        config: Any = model.config
        self.model: Any = model
        self.model_type: str = config.model_type
        self.spec = spec_for(self.model_type)
        self.text_config: Any = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hidden_size: int = int(self.text_config.hidden_size)
        self.blocks: nn.ModuleList = get_submodule(model, self.spec.blocks)  # type: ignore[assignment]
        self.n_layers: int = len(self.blocks)
        for layer in range(self.n_layers):  # an unmatched layout fails at load, never as a silent partial bake
            self.writers("attn_out", layer)
            self.writers("mlp_out", layer)

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
        if site in READ_SITES:
            if not self.spec.read_norms:
                raise UserError(f"Read-side steering (site {site}) needs separate inputs for attention and the MLP; "
                                f"{self.model_type} blocks read both through one norm. Use --mode ablate instead.")
            return get_submodule(block, self.spec.read_norms[READ_SITES.index(site)])
        raise UserError(f"Unknown site '{site}'. Valid sites: {', '.join(SITES)}.")

    def site_scale(self, site: str) -> float:
        """What the block multiplies a site module's output by before adding it (Granite's residual
        multiplier); hooks see and edit the scaled contribution, which is what the site names."""
        if site in ("attn_out", "mlp_out") and self.spec.residual_multiplier:
            return float(getattr(self.text_config, self.spec.residual_multiplier))
        return 1.0

    def writers(self, site: str, layer: int) -> list[Writer]:
        """The tensors whose outputs a hook at (site, layer) sees: the embeddings for resid_pre at layer 0
        (their sum), the attention output projection for attn_out, every MLP or expert down projection for
        mlp_out."""
        if site == "resid_pre" and layer == 0:
            return [w for name in self.spec.embeddings for w in _module_writers(self.model, name, name, False)]
        block, prefix = self.block(layer), f"{self.spec.blocks}.{layer}"
        if site == "attn_out":
            return _module_writers(block, self.spec.attn_proj, f"{prefix}.{self.spec.attn_proj}", self.spec.conv1d)
        if site == "mlp_out":
            return self._mlp_writers(block, prefix)
        raise UserError(f"No fixed set of weights writes site '{site}' at layer {layer}: only the embeddings "
                        "(resid_pre at layer 0), attn_out and mlp_out have writers.")

    def _mlp_writers(self, block: nn.Module, prefix: str) -> list[Writer]:
        spec, experts = self.spec, self.spec.experts
        if experts is not None and find_submodule(block, experts.path) is not None:
            return self._expert_writers(block, prefix, experts)
        if spec.mlp_proj and find_submodule(block, spec.mlp_proj) is not None:
            return _module_writers(block, spec.mlp_proj, f"{prefix}.{spec.mlp_proj}", spec.conv1d)
        raise self._unmatched(block, prefix)

    def _expert_writers(self, block: nn.Module, prefix: str, experts: Experts) -> list[Writer]:
        container, name = get_submodule(block, experts.path), f"{prefix}.{experts.path}"
        writers: list[Writer] = []
        if isinstance(container, nn.ModuleList):
            for i, expert in enumerate(container):
                if not isinstance(getattr(expert, experts.down, None), nn.Linear):
                    raise self._unmatched(block, prefix)
                writers += _module_writers(expert, experts.down, f"{name}.{i}.{experts.down}", False)
        else:
            axis = 2 if experts.transposed else 1
            down = getattr(container, experts.down, None)
            if not (isinstance(down, torch.Tensor) and down.dim() == 3 and down.shape[axis] == self.hidden_size):
                raise self._unmatched(block, prefix)
            writers.append(Writer(f"{name}.{experts.down}", down, axis))
            if experts.bias:
                bias = getattr(container, experts.bias, None)
                if not (isinstance(bias, torch.Tensor) and bias.shape == (down.shape[0], self.hidden_size)):
                    raise self._unmatched(block, prefix)
                writers.append(Writer(f"{name}.{experts.bias}", bias, 1))
        for dotted in experts.shared:
            if find_submodule(block, dotted) is None:
                raise self._unmatched(block, prefix)
            writers += _module_writers(block, dotted, f"{prefix}.{dotted}", False)
        return writers

    def _unmatched(self, block: nn.Module, prefix: str) -> UserError:
        spec = self.spec
        expected = " or ".join(([spec.experts.describe()] if spec.experts else [])
                               + ([f"a dense {spec.mlp_proj}"] if spec.mlp_proj else []))
        mlp = find_submodule(block, spec.mlp_out)
        root, where = (mlp, f"{spec.mlp_out}.") if isinstance(mlp, nn.Module) else (block, "")
        found = [f"{where}{n} {list(p.shape)}" for n, p in root.named_parameters()]
        shown = ", ".join(found[:24]) + (f", ... ({len(found)} in all)" if len(found) > 24 else "")
        return UserError(f"{prefix}: the MLP weights do not match the adapter's '{self.model_type}' row, which "
                         f"expects {expected}. Parameters found: {shown or 'none'}. Editing what this block writes "
                         "(export, ablation bakes) would miss them, so the model is refused. Fix or add the row "
                         "(Experts(...) names the experts) in src/alignment_artifacts/models/adapter.py.")

    def write_gain(self, site: str, layer: int) -> torch.Tensor | None:
        """The per-unit gain g of a norm between the projections at (site, layer) and the residual stream,
        None where they write as is. The norm's output . u is (x . g*u) / rms(x), so a projection made
        orthogonal to g*u writes nothing along u through the norm."""
        if not self.spec.post_norms or site not in ("attn_out", "mlp_out"):
            return None
        norm: Any = self.site_module(site, layer)
        return norm.weight.detach().float() + self.spec.norm_offset

    def residual_writers(self) -> Iterator[Writer]:
        """Every tensor that writes into the residual stream."""
        yield from self.writers("resid_pre", 0)
        for layer in range(self.n_layers):
            yield from self.writers("attn_out", layer)
            yield from self.writers("mlp_out", layer)

    @property
    def bake_is_exact(self) -> bool:
        """Whether orthogonalising the writers removes a direction exactly (no post-projection norm)."""
        return not self.spec.post_norms

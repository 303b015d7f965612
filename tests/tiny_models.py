"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "How do I bake bread at home with flour, water and yeast?", "Explain how locks and keys work.",
    "Write a short poem about the sea and the sky.", "Tell me about the history of the printing press.",
    "user assistant system hello world answer question please thanks",
] * 4

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
                  "exaone", "internlm3", "cohere", "granite", "starcoder2", "olmo2", "olmo3", "exaone4", "phi",
                  "falcon")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
POST_NORMED = ("gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4")  # a norm between projection and residual


@functools.cache
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


def config_class(name: str) -> Any:
    """A config class of the installed transformers; a family an older release lacks skips the test."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def tiny_config(family: str, layers: int = 4, hidden: int = 64) -> Any:
    vocab = len(tiny_tokenizer())
    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=hidden * 2,
                                  max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                  tie_word_embeddings=False)
    llama_like = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "phi3": "Phi3Config", "exaone": "ExaoneConfig", "internlm3": "InternLM3Config",
                  "cohere": "CohereConfig", "granite": "GraniteConfig", "starcoder2": "Starcoder2Config",
                  "olmo2": "Olmo2Config", "olmo3": "Olmo3Config", "exaone4": "Exaone4Config"}
    if family in llama_like:
        extra: dict[str, Any] = {"num_key_value_heads": 2}
        if family in ("qwen3", "internlm3", "exaone4"):
            extra["head_dim"] = hidden // 4
        if family == "granite":  # block outputs scaled before the residual add
            extra.update(residual_multiplier=0.3, embedding_multiplier=2.0)
        if family in ("olmo3", "exaone4"):
            extra["sliding_window"] = 16
        return config_class(llama_like[family])(**common, **extra)
    if family in MOE_FAMILIES:
        return _moe_config(family, common, hidden)
    if family == "phi":  # parallel attention and MLP, biased projections
        return config_class("PhiConfig")(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if family == "falcon":  # parallel attention and MLP, biased projections
        return config_class("FalconConfig")(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=4, bias=True, parallel_attn=True,
                                            ffn_hidden_size=hidden * 2, pad_token_id=0, eos_token_id=2,
                                            bos_token_id=1, tie_word_embeddings=False)
    if family in ("gemma", "gemma2", "gemma3_text"):
        names = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}
        cls = config_class(names[family])
        extra = {"num_key_value_heads": 2, "head_dim": hidden // 4}
        if family != "gemma":
            extra.update(sliding_window=16, query_pre_attn_scalar=hidden // 4)
        return cls(**common, **extra)
    if family == "gpt2":
        return config_class("GPT2Config")(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                                          n_positions=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "gpt_neox":
        return config_class("GPTNeoXConfig")(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=4, intermediate_size=hidden * 2,
                                             max_position_embeddings=256, pad_token_id=0, eos_token_id=2,
                                             bos_token_id=1, use_parallel_residual=True, tie_word_embeddings=False)
    raise ValueError(family)


def _moe_config(family: str, common: dict[str, Any], hidden: int) -> Any:
    """Four experts, two per token, expert width unlike the hidden size (so a transposed layout shows)."""
    base = dict(common, num_key_value_heads=2, num_experts_per_tok=2)
    if family == "qwen2_moe":  # shared expert; layer 1 is a dense MLP
        return config_class("Qwen2MoeConfig")(**base, num_experts=4, moe_intermediate_size=hidden // 2,
                                              shared_expert_intermediate_size=hidden, mlp_only_layers=[1])
    if family == "qwen3_moe":
        return config_class("Qwen3MoeConfig")(**base, num_experts=4, moe_intermediate_size=hidden // 2,
                                              head_dim=hidden // 4)
    if family == "olmoe":
        return config_class("OlmoeConfig")(**base, num_experts=4)
    if family == "mixtral":
        return config_class("MixtralConfig")(**base, num_local_experts=4)
    if family == "gpt_oss":  # fused [experts, inter, hidden] down projection with a bias
        return config_class("GptOssConfig")(**base, num_local_experts=4, head_dim=hidden // 4, sliding_window=16,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(family)


def tiny_model(family: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0,
               attn_implementation: str = "eager", tied: bool = False) -> Any:
    """A LoadedModel wrapping a random tiny model of ``family`` in float32 (``tied``: the LM head is the
    embedding matrix)."""
    from transformers import AutoModelForCausalLM

    from alignment_artifacts.models import wrap_model

    torch.manual_seed(seed)
    config = tiny_config(family, layers, hidden)
    if tied:  # (gpt2's config ties by default)
        config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init so that tiny models produce varied tokens
        for name, param in model.named_parameters():
            matrix = param.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name
            if matrix or name.endswith("bias"):  # non-zero biases too, so that baking must handle them
                param.normal_(0.0, 0.08)
    return wrap_model(model, tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny(family: str, folder: Any, layers: int = 4) -> Any:
    """A tiny random model saved as a local Hugging Face folder (for CLI tests)."""
    loaded = tiny_model(family, layers=layers)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


class ExpertMLP(torch.nn.Module):
    """One expert as its own module, with the weights of one slice of a fused gate-up/down pair."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: Any):
        super().__init__()
        hidden, inter = down.shape
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act = act
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up[:inter])
            self.up_proj.weight.copy_(gate_up[inter:])
            self.down_proj.weight.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(torch.nn.ModuleList):
    """Experts as a list of modules (transformers 4 and remote-code layout), called like fused experts."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            out.index_add_(0, token, expert(hidden[token]) * top_k_weights[token, slot, None])
        return out


def unfuse_experts(loaded: Any) -> Any:
    """The same model with every fused (Qwen2-MoE/OLMoE/Mixtral layout) expert tensor split into a list."""
    from alignment_artifacts.models import wrap_model

    for block in loaded.adapter.blocks:
        fused = getattr(block.mlp, "experts", None)
        if fused is not None:
            block.mlp.experts = ExpertList(ExpertMLP(fused.gate_up_proj[e], fused.down_proj[e], fused.act_fn)
                                           for e in range(fused.num_experts))
    return wrap_model(loaded.model, loaded.tokenizer, name=f"{loaded.info.name}-unfused")

"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import functools
from typing import Any

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "How do I bake bread at home with flour, water and yeast?", "Explain how locks and keys work.",
    "Write a short poem about the sea and the sky.", "Tell me about the history of the printing press.",
    "user assistant system hello world answer question please thanks",
] * 4

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox")


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


def tiny_config(family: str, layers: int = 4, hidden: int = 64) -> Any:
    import transformers as tf

    vocab = len(tiny_tokenizer())
    common: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=hidden * 2,
                                  max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                                  tie_word_embeddings=False)
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}[family]
        extra = {"num_key_value_heads": 2}
        if family == "qwen3":
            extra["head_dim"] = hidden // 4
        return cls(**common, **extra)
    if family in ("gemma", "gemma2", "gemma3_text"):
        cls = {"gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig}[family]
        extra = {"num_key_value_heads": 2, "head_dim": hidden // 4}
        if family != "gemma":
            extra.update(sliding_window=16, query_pre_attn_scalar=hidden // 4)
        return cls(**common, **extra)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                             pad_token_id=0, eos_token_id=2, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=256,
                                pad_token_id=0, eos_token_id=2, bos_token_id=1, use_parallel_residual=True,
                                tie_word_embeddings=False)
    raise ValueError(family)


def tiny_model(family: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0,
               attn_implementation: str = "eager") -> Any:
    """A LoadedModel wrapping a random tiny model of ``family`` in float32."""
    from transformers import AutoModelForCausalLM

    from alignment_artifacts.models import wrap_model

    torch.manual_seed(seed)
    config = tiny_config(family, layers, hidden)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init so that tiny models produce varied tokens
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.08)
    return wrap_model(model, tiny_tokenizer(), name=f"tiny-{family}")


def save_tiny(family: str, folder: Any, layers: int = 4) -> Any:
    """A tiny random model saved as a local Hugging Face folder (for CLI tests)."""
    loaded = tiny_model(family, layers=layers)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder

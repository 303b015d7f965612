"""A tiny llama-family GGUF file written from a tiny random HF model, for export and loader tests.

Only what llama.cpp and transformers' GGUF loader need for a llama model with a byte-level BPE
tokenizer: hyperparameters, the tokenizer, and every tensor under its GGUF name (llama.cpp rotates
query/key pairs as interleaved halves, so those two matrices are stored permuted per head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _interleave_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from [first half; second half] to alternating pairs (llama.cpp's rope)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(writer: Any, tokenizer: Any) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    for added in backend["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in backend["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def q4_k_blocks(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random valid Q4_K data of ``shape`` (a type the gguf package reads but cannot write): each
    256-value block is two float16 scales followed by random 6-bit scales and 4-bit values."""
    rows, cols = shape
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # d
    blocks[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # dmin
    return blocks.reshape(rows, -1)


def write_tiny_llama_gguf(loaded: Any, path: Path, matrix_type: str = "F32",
                          types: dict[str, str] | None = None) -> Path:
    """Write ``loaded`` (a tiny llama from tiny_models) as a GGUF: 2-D weights in ``matrix_type``
    (``types`` overrides it per GGUF tensor name; Q4_K gets random values), norms in F32."""
    import gguf

    model, config = loaded.model, loaded.model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(config.hidden_size // n_head)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _tokenizer_fields(writer, loaded.tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            data = _interleave_heads(data, n_head)
        elif name.endswith("attn_k.weight"):
            data = _interleave_heads(data, n_kv)
        qtype = gguf.GGMLQuantizationType[(types or {}).get(name, matrix_type if data.ndim == 2 else "F32")]
        stored = q4_k_blocks(data.shape) if qtype.name == "Q4_K" else gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def open_llama(path: Path) -> Any:
    """A llama-cpp-python model on plain CPU kernels: llama.cpp's AMX weight repacking segfaults on
    some Sapphire Rapids hosts, this one included (ggml-org/llama.cpp#20824), so extra buffer types
    (repacking) are turned off, as llama.cpp's --no-repack would."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    defaults = llama_cpp.llama_model_default_params

    def no_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = no_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1, seed=0)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults

"""Prove an exported control vector does in llama.cpp what the hooks do in transformers.

Runs on a builtin model (SmolLM2-135M-Instruct by default, or ``--model
qwen2.5-coder-1.5b-instruct``), whose HF weights in this package are the dequantized GGUF that
llama.cpp loads, so plain-vs-plain differences are only llama.cpp's quantized matmuls (the
"quantisation floor"). Steps: compute an ``amplify`` direction (collects activations on the
bundled prompts: about a minute on a laptop CPU), export it with ``--format gguf-control-vector``,
then compare how the first-token distribution moves under the hooked HF model and under llama.cpp
with the control vector applied.

llama-cpp-python does not expose llama.cpp's GGUF control-vector loader (it lives in
``common/``), so ``apply_control_vector`` repeats that loader's layout: ``direction.N`` goes to
offset (N-1)*n_embd of the buffer handed to ``llama_set_adapter_cvec``. With the llama.cpp CLI:
``llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --control-vector-scaled FILE.gguf 1.0``.

    python examples/llama_cpp_control_vector.py [--model NAME] [--scale 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "How do I boil an egg?",
    "Explain photosynthesis to a child.", "Give me three tips for better sleep.",
    "What is 17 times 23?", "Suggest a name for a friendly golden retriever.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
]
BUILTIN = "smollm2-135m-instruct"


def gguf_path(name: str) -> Path:
    """The builtin's own GGUF file (assembled and checksum-verified on first use)."""
    from alignment_artifacts.models.builtin import get_builtin
    from alignment_artifacts.models.builtin import gguf_path as builtin_gguf

    return builtin_gguf(get_builtin(name))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """Mean over prompts of KL(p || q)."""
    return float((np.exp(logp) * (logp - logq)).sum(-1).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def hf_first_token_logp(loaded: Any, ids: list[list[int]]) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for seq in ids:
            logits = loaded.model(input_ids=torch.tensor([seq], device=loaded.device)).logits[0, -1]
            rows.append(logits.float().cpu().numpy())
    return log_softmax(np.stack(rows))


def apply_control_vector(llm: Any, tensors: dict[str, np.ndarray] | None) -> None:
    """Set (or clear, with None) a control vector exactly as llama.cpp's GGUF loader would lay it out."""
    import llama_cpp

    setter = next(getattr(llama_cpp, name) for name in
                  ("llama_set_adapter_cvec", "llama_apply_adapter_cvec", "llama_control_vector_apply")
                  if hasattr(llama_cpp, name))
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    if tensors is None:
        status = setter(llm.ctx, None, 0, n_embd, -1, -1)
    else:
        indices = {int(name.split(".")[1]): v for name, v in tensors.items()}
        data = np.zeros(n_embd * max(indices), dtype=np.float32)
        for n, vector in indices.items():
            data[(n - 1) * n_embd: n * n_embd] += vector  # direction.N at (N-1)*n_embd: layer 1 at [0]
        buffer = (ctypes.c_float * len(data)).from_buffer(data)
        status = setter(llm.ctx, buffer, len(data), n_embd, 1, n_layer)
    if status != 0:
        raise RuntimeError(f"llama.cpp refused the control vector (status {status})")


def llama_first_token_logp(llm: Any, ids: list[list[int]], n_vocab: int) -> np.ndarray:
    rows = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        rows.append(np.array(llm.scores[len(seq) - 1, :n_vocab]))
    return log_softmax(np.stack(rows))


def shifted(tensors: dict[str, np.ndarray], by: int) -> dict[str, np.ndarray]:
    return {f"direction.{int(name.split('.')[1]) + by}": v for name, v in tensors.items()
            if int(name.split(".")[1]) + by >= 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN, help="builtin model (its GGUF is what llama.cpp loads)")
    parser.add_argument("--scale", type=float, default=1.0, help="amplify scale (h + scale*v)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="0-based blocks (default: at 40%%, 50%% and 60%% of the depth)")
    parser.add_argument("--keep", type=Path, help="write the control vector here instead of a temp folder")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("SKIPPED: llama_cpp is not installed. Install it with `pip install llama-cpp-python` (it compiles "
              "llama.cpp from source: several minutes) and run this again.")
        return

    from alignment_artifacts.api import get_directions, resolve_config
    from alignment_artifacts.export import export, read_control_vector
    from alignment_artifacts.models import format_chat, load_model
    from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering

    loaded = load_model(args.model, device="cpu", dtype="float32")
    n_layers = loaded.adapter.n_layers
    layers = args.layers or sorted({round(f * n_layers) for f in (0.4, 0.5, 0.6)})
    config = resolve_config(loaded, SteeringConfig(mode="amplify", scale=args.scale, layers=layers,
                                                   site="resid_post"))
    directions = get_directions(loaded, config)
    out = (args.keep or Path(tempfile.mkdtemp())) / f"{args.model}-amplify.gguf"
    export(loaded, Steering(config, directions), out, format="gguf-control-vector", force=True)
    cv = read_control_vector(out)
    print(f"control vector: {out} ({cv['arch']}, {', '.join(cv['tensors'])}; direction layer "
          f"{config.direction_layer}, |v| = {directions.norm(config.direction_layer):.2f}, scale {config.scale})")

    ids = [loaded.tokenizer(format_chat(loaded.tokenizer, p), add_special_tokens=False).input_ids
           for p in PROMPTS]
    hf_plain = hf_first_token_logp(loaded, ids)
    with apply_steering(loaded, config, directions):
        hf_steered = hf_first_token_logp(loaded, ids)

    llm = llama_cpp.Llama(model_path=str(gguf_path(args.model)), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=2, seed=0)
    n_vocab = min(llm.n_vocab(), hf_plain.shape[1])
    hf_plain, hf_steered = hf_plain[:, :n_vocab], hf_steered[:, :n_vocab]
    ll_plain = llama_first_token_logp(llm, ids, n_vocab)
    apply_control_vector(llm, cv["tensors"])
    ll_steered = llama_first_token_logp(llm, ids, n_vocab)
    off_by_one = {}
    for by in (-1, 1):
        apply_control_vector(llm, shifted(cv["tensors"], by))
        off_by_one[by] = llama_first_token_logp(llm, ids, n_vocab)
    apply_control_vector(llm, None)

    hf_change, ll_change = hf_steered - hf_plain, ll_steered - ll_plain
    print(f"model: {args.model}; llama_cpp {llama_cpp.__version__}, {len(PROMPTS)} prompts, first generated token, "
          f"layers {layers}")
    print(f"cosine between changes: {cosine(hf_change, ll_change):.4f}")
    print(f"KL(hf_steered||llama_steered): {kl(hf_steered, ll_steered):.5f}")
    print(f"KL(hf_plain||llama_plain) (quantisation floor): {kl(hf_plain, ll_plain):.5f}")
    print(f"KL(hf_steered||hf_plain) (size of the steering effect): {kl(hf_steered, hf_plain):.5f}")
    agree = int((hf_steered.argmax(-1) == ll_steered.argmax(-1)).sum())
    print(f"top-1 token agrees (steered): {agree}/{len(PROMPTS)}")
    for by, logp in off_by_one.items():
        print(f"control: vector shifted {by:+d} block -> cosine {cosine(hf_change, logp - ll_plain):.4f}, "
              f"KL(hf_steered||llama) {kl(hf_steered, logp):.5f}")


if __name__ == "__main__":
    main()

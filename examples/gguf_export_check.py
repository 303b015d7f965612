"""Check `export --format gguf` of a builtin model in llama.cpp against the hooked ablation.

1. Bakes ablation (`--config FILE`, else plain ablation at the default direction layer) into
   the builtin's own GGUF file (`export --format gguf`, `--gguf-type` for the rewritten tensors).
2. First-token distributions on the bundled harmful and ordinary prompts: KL(hooked || llama.cpp
   running the export), next to the quantisation floor KL(transformers || llama.cpp) of the
   unmodified model (both sides read the same GGUF values, so the floor is llama.cpp's arithmetic).
3. Greedy answers (--max-tokens) to the harmful prompts from the hooked model and from llama.cpp
   running the export: refusal counts (evaluation.is_refusal) and token-level agreement, next to
   the same for the unmodified model in transformers and in llama.cpp (the floor for greedy).
   Only counts, rates and divergences are printed, never an answer.

Prints `name: value` lines. Needs llama-cpp-python (`pip install 'alignment-artifacts[llama]'`).

    python examples/gguf_export_check.py --model smollm2-135m-instruct [--gguf-type auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BUILTIN = "smollm2-135m-instruct"


def llama_first_logits(llm: Any, rows: list[list[int]], n_vocab: int) -> torch.Tensor:
    out = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(np.array(llm.scores[len(ids) - 1, :n_vocab], dtype=np.float32)))
    return torch.stack(out)


def llama_greedy(llm: Any, rows: list[list[int]], max_tokens: int, stops: set[int]) -> list[list[int]]:
    answers = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        answer: list[int] = []
        while len(answer) < max_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in stops:
                break
            answer.append(token)
            llm.eval([token])
        answers.append(answer)
    return answers


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over prompts of KL(p || q), in float64."""
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """How many answers are identical, and the mean share of the longer answer that matches as a prefix."""
    identical, shares = 0, []
    for x, y in zip(a, b):
        identical += x == y
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        shares.append(same / max(len(x), len(y), 1))
    return identical, float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN, help="builtin model (its own GGUF file is rewritten)")
    parser.add_argument("--config", help="a steering configuration JSON to bake (mode ablate; default: plain "
                                         "ablation at the default direction layer)")
    parser.add_argument("--gguf-type", default="auto", help="type of the rewritten tensors (default auto)")
    parser.add_argument("--out", type=Path, help="the exported .gguf (default: a temporary file)")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy answer length (default 48)")
    parser.add_argument("--n-ordinary", type=int, default=72, help="ordinary prompts in the KL (default 72)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("SKIPPED: llama_cpp is not installed; pip install 'alignment-artifacts[llama]' (compiles llama.cpp).")
        return

    from alignment_artifacts.api import get_directions, get_model, resolve_config
    from alignment_artifacts.evaluation import (
        EvaluationSettings,
        chat_texts,
        first_logits,
        generated_refusals,
        is_refusal,
        load_group_sets,
    )
    from alignment_artifacts.export import export
    from alignment_artifacts.export_gguf import open_llama_cpp, read_manifest, source_gguf
    from alignment_artifacts.models.generation import stop_token_ids
    from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering

    started = time.perf_counter()
    loaded = get_model(args.model, device="cpu", dtype="float32")
    config = resolve_config(loaded, SteeringConfig.load(args.config) if args.config else SteeringConfig(mode="ablate"))
    directions = get_directions(loaded, config, progress=False)
    out = args.out or Path(tempfile.mkdtemp(prefix="aa-gguf-")) / f"{args.model}-ablated.gguf"
    export_started = time.perf_counter()
    export(loaded, Steering(config, directions), out, format="gguf", force=True, gguf_type=args.gguf_type)
    export_seconds = time.perf_counter() - export_started
    modified = read_manifest(out)["modified"]

    sets = load_group_sets(EvaluationSettings(groups=("harmful", "ordinary"), n_ordinary=args.n_ordinary))
    harmful_texts, ordinary_texts = chat_texts(loaded, sets.harmful, None), chat_texts(loaded, sets.ordinary, None)
    texts = harmful_texts + ordinary_texts
    rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    plain = first_logits(loaded, texts)
    with apply_steering(loaded, config, directions):
        hooked = first_logits(loaded, texts)
        hooked_answers = generated_refusals(loaded, harmful_texts, args.max_tokens)
    unmodified_answers = generated_refusals(loaded, harmful_texts, args.max_tokens)

    stops = set(stop_token_ids(loaded.model, loaded.tokenizer))
    llama_source = open_llama_cpp(source_gguf(loaded), n_threads=args.threads)
    n_vocab = min(llama_source.n_vocab(), plain.shape[1])
    llama_plain = llama_first_logits(llama_source, rows, n_vocab)
    plain_answers = llama_greedy(llama_source, rows[:len(harmful_texts)], args.max_tokens, stops)
    del llama_source
    llama_export = open_llama_cpp(out, n_threads=args.threads)
    llama_ablated = llama_first_logits(llama_export, rows, n_vocab)
    gguf_answers = llama_greedy(llama_export, rows[:len(harmful_texts)], args.max_tokens, stops)

    def refusals(answers: list[list[int]]) -> int:
        return sum(is_refusal(loaded.tokenizer.decode(a, skip_special_tokens=True)) for a in answers)

    plain, hooked = plain[:, :n_vocab], hooked[:, :n_vocab]
    floor, ablated = kl(plain, llama_plain), kl(hooked, llama_ablated)
    identical, share = prefix_agreement(hooked_answers.ids, gguf_answers)
    floor_identical, floor_share = prefix_agreement(unmodified_answers.ids, plain_answers)
    n_h = len(harmful_texts)
    types = sorted({f"{m['source_type']}->{m['written_type']}" for m in modified.values()})
    print(f"model: {loaded.info.name}")
    print(f"configuration: mode={config.mode} scale={config.scale:.3f} direction_layer={config.direction_layer} "
          f"({config.notes.get('auto', 'explicit')})")
    print(f"gguf_type: {args.gguf_type} ({', '.join(types)}; {len(modified)} tensors rewritten)")
    print(f"export_seconds: {export_seconds:.1f}")
    print(f"max_requantization_rms_error: {max(m['requantization_rms_error'] for m in modified.values()):.4f}")
    print(f"prompts: {n_h} harmful + {len(ordinary_texts)} ordinary (first-token KL over all)")
    print(f"kl_hooked_vs_gguf: {ablated:.5f}")
    print(f"kl_floor_unmodified_hf_vs_llama: {floor:.5f}")
    print(f"kl_ratio_to_floor: {ablated / max(floor, 1e-12):.2f}")
    print(f"kl_hooked_vs_gguf_harmful: {kl(hooked[:n_h], llama_ablated[:n_h]):.5f}")
    print(f"kl_hooked_vs_gguf_ordinary: {kl(hooked[n_h:], llama_ablated[n_h:]):.5f}")
    print(f"kl_ablation_effect_hooked_vs_unmodified: {kl(hooked, plain):.5f}")
    print(f"top1_agreement_hooked_vs_gguf: {int((hooked.argmax(-1) == llama_ablated.argmax(-1)).sum())}/{len(texts)}")
    print(f"refusals_harmful_unmodified_hf: {sum(unmodified_answers.flags)}/{n_h}")
    print(f"refusals_harmful_unmodified_llama: {refusals(plain_answers)}/{n_h}")
    print(f"refusals_harmful_hooked: {sum(hooked_answers.flags)}/{n_h}")
    print(f"refusals_harmful_gguf: {refusals(gguf_answers)}/{n_h}")
    print(f"greedy_identical_answers_hooked_vs_gguf: {identical}/{n_h}")
    print(f"greedy_matching_prefix_share_hooked_vs_gguf: {share:.3f}")
    print(f"greedy_identical_answers_floor_unmodified_hf_vs_llama: {floor_identical}/{n_h}")
    print(f"greedy_matching_prefix_share_floor: {floor_share:.3f}")
    print(f"total_seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()

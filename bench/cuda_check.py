"""What half precision on a CUDA GPU does to directions, steering and gates, against float32 there.

The pipeline is tested on the CPU in float32; users run it on GPUs in bfloat16. This builds a random
Qwen2-style model folder from a config (no downloads; ``--hidden`` and ``--layers`` size it), loads it on
the GPU in float32 and in half precision (bfloat16 where supported, float16 with ``--dtype float16``),
and prints, half precision against float32 on the same GPU:

* directions from the bundled contrast pairs: per-layer cosine;
* each steering mode at its defaults, with the float32 directions on both sides: first-token KL between the
  two precisions steered, over the same unsteered (the ratio is how much a mode's hooks add to the error
  half precision already makes), and top-1 agreement;
* a gate at level 0.3: how many decisions the two precisions share;
* greedy generation, batched against one prompt at a time: tokens that agree (float32, plain and ablated).

Random weights make the directions meaningless as safety directions; the numerics are what is measured.
Prints one line per check and a JSON summary (``--out``). Needs a CUDA GPU. The model folder is kept (its
path is printed) for the other benches, e.g. ``bench/steer.py --model FOLDER``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignment_artifacts.api import get_directions
from alignment_artifacts.evaluation import first_logits, kl_divergence
from alignment_artifacts.evaluation.passes import chat_texts, last_token_states
from alignment_artifacts.models import GenerationConfig, generate, load_model
from alignment_artifacts.prompts import load_builtin
from alignment_artifacts.steering import STEERING_MODES, SteeringConfig, apply_steering, gate_passes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_tokenizer  # the tests' offline tokenizer


def build_folder(folder: Path, hidden: int, layers: int) -> Path:
    """A random Qwen2-style model saved as a model folder (config, safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         intermediate_size=hidden * 3, max_position_embeddings=512, pad_token_id=0, eos_token_id=2,
                         bos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one check, keep what it measured, and carry on past a failure (reported, not hidden)."""
    started = time.perf_counter()
    try:
        results[name] = {**fn(), "seconds": round(time.perf_counter() - started, 2)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    except Exception as exc:  # a GPU-only failure is the finding: report it and run the other checks
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="the half precision: auto (bfloat16 if supported), float16")
    parser.add_argument("--prompts", type=int, default=32, help="ordinary prompts the steering checks use")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script here")
    parser.add_argument("--out", help="write the JSON summary here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return 0
    folder = build_folder(Path(tempfile.mkdtemp(prefix="cuda-check-")), args.hidden, args.layers)
    full = load_model(str(folder), device=args.device, dtype="float32")
    half = load_model(str(folder), device=args.device, dtype="bfloat16" if args.device == "cpu" else args.dtype)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    results: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "half": half.info.dtype,
                               "hidden": args.hidden, "layers": args.layers, "folder": str(folder)}
    print(json.dumps(results), flush=True)
    directions = {m.info.dtype: get_directions(m, SteeringConfig(mode="ablate"), progress=False)
                  for m in (full, half)}
    d32, d16 = directions["float32"], directions[half.info.dtype]
    ordinary = chat_texts(full, [p.text for p in load_builtin("harmless").prompts][:args.prompts], None)

    def cosines() -> dict[str, Any]:
        # a layer where every prompt's last token has the same activation (the embedding of the template's last
        # token) has no direction in either precision: it is left out
        layers = [layer for layer in d32.layers if float(d32.vectors[layer].norm()) > 1e-6]
        cos = [float(torch.nn.functional.cosine_similarity(d32.vectors[layer].float(), d16.vectors[layer].float(),
                                                             dim=0)) for layer in layers]
        return {"layers": len(layers), "min": round(min(cos), 5), "median": round(statistics.median(cos), 5)}

    def steering() -> dict[str, Any]:
        plain = {m.info.dtype: first_logits(m, ordinary, 16).float().cpu() for m in (full, half)}
        floor = float(kl_divergence(plain["float32"], plain[half.info.dtype]).mean())
        rows: dict[str, Any] = {"unsteered_kl": floor}
        for mode in STEERING_MODES:
            config = SteeringConfig(mode=mode)
            steered = {}
            try:
                for m in (full, half):
                    with apply_steering(m, config, d32):
                        steered[m.info.dtype] = first_logits(m, ordinary, 16).float().cpu()
            except Exception as exc:  # a mode that needs more than its defaults: say which and why
                rows[mode] = f"{type(exc).__name__}: {str(exc)[:120]}"
                continue
            a, b = steered["float32"], steered[half.info.dtype]
            kl = float(kl_divergence(a, b).mean())
            rows[mode] = {"kl": round(kl, 6), "over_unsteered": round(kl / max(floor, 1e-12), 2),
                          "top1": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 3),
                          "effect_kl": round(float(kl_divergence(plain["float32"], a).mean()), 4)}
        return rows

    def gate() -> dict[str, Any]:
        layer = d32.layers[len(d32.layers) // 2]
        mixed = [p.text for p in load_builtin("harmful").prompts][:args.prompts] + \
            [p.text for p in load_builtin("harmless").prompts][:args.prompts]
        passes = {m.info.dtype: gate_passes(d32, layer, 0.3, last_token_states(
            m, chat_texts(m, mixed, None), d32.site, [layer], 16)[layer].float().cpu()) for m in (full, half)}
        same = (passes["float32"] == passes[half.info.dtype]).float().mean()
        return {"layer": layer, "agree": round(float(same), 4), "passed_f32": int(passes["float32"].sum())}

    def batching() -> dict[str, Any]:
        greedy = GenerationConfig(max_tokens=24, ignore_end_tokens=True)
        rows: dict[str, Any] = {}
        for label, config in (("plain", None), ("ablate", SteeringConfig(mode="ablate"))):
            with apply_steering(full, config, d32) if config else contextlib.nullcontext():
                batched = generate(full, ordinary[:8], greedy, batch_size=8, chat=False).tokens
                single = [generate(full, [t], greedy, batch_size=1, chat=False).tokens[0] for t in ordinary[:8]]
            same = [sum(x == y for x, y in zip(a, b)) / max(len(a), 1) for a, b in zip(batched, single)]
            rows[label] = {"rows_equal": sum(a == b for a, b in zip(batched, single)) / len(single),
                           "tokens_agree": round(statistics.mean(same), 4)}
        return rows

    check(results, "direction_cosine", cosines)
    check(results, "steering_first_token", steering)
    check(results, "gate_decisions", gate)
    check(results, "batched_equals_single_f32", batching)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Flags shared by several commands, and the API values they turn into.

Each ``add_*`` function adds one group of flags; the function below it reads that group back from
the parsed arguments: ``add_model`` -> ``load``, ``add_prompts`` -> ``prompt_set``,
``add_generation`` -> ``generation``, ``add_steering`` -> ``steering_request``,
``add_direction_variant`` (part of ``add_steering``, and ``analyze``'s) -> ``direction_variant``,
``add_judge`` -> ``judge``. New flags for a group go next to its reader. ``emit`` and ``log`` are the output side:
stdout carries the result (text, or JSON under ``--json``), stderr the progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..judge import Judge
    from ..models import GenerationConfig, LoadedModel
    from ..prompts import PromptSet
    from ..steering import SteeringConfig


# Output -------------------------------------------------------------------------------------

def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="print timings and progress details")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--cache-dir", help="cache root (default ~/.cache/alignment-artifacts or "
                                       "$ALIGNMENT_ARTIFACTS_CACHE)")


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print JSON under --json, else the human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)


def log(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr, kept out of --json runs unless --verbose."""
    if not getattr(args, "json", False) or getattr(args, "verbose", False):
        print(message, file=sys.stderr, flush=True)


def split(value: str | None) -> list[str] | None:
    """A comma-separated flag as a list; None when it is unset or empty."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


# Model --------------------------------------------------------------------------------------

def add_model(p: argparse.ArgumentParser) -> None:
    from ..models import BUILTINS, DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"builtin name ({', '.join(BUILTINS)}), local folder, .gguf file or hub id "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--quantization", choices=["bnb-4bit", "bnb-8bit"], help="bitsandbytes loading (CUDA only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--offload-folder", help="dispatch the model with accelerate (GPUs, then CPU RAM) and offload "
                                            "what does not fit to this folder")


def load(args: argparse.Namespace) -> LoadedModel:
    from ..api import get_model

    started = time.perf_counter()
    loaded = get_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                       trust_remote_code=args.trust_remote_code, offload_folder=args.offload_folder)
    if getattr(args, "verbose", False):
        print(f"loaded {loaded.info.name} in {time.perf_counter() - started:.2f} s ({loaded.info.dtype}, "
              f"{loaded.info.device}, {loaded.info.n_layers} layers, hidden {loaded.info.hidden_size})",
              file=sys.stderr)
    return loaded


# Prompts ------------------------------------------------------------------------------------

def add_prompts(p: argparse.ArgumentParser, default: str = "pairs") -> None:
    p.add_argument("--prompts", default=default,
                   help=f"builtin set (pairs, instructions, harmful, harmless, ordinary; NAME:SPLIT for one split, "
                        f"e.g. ordinary:val), a file (json, jsonl, csv, txt), "
                        f"'POSITIVE,NEGATIVE' files, or hf:NAME[:SPLIT[:COLUMN]] (default {default})")
    p.add_argument("--text-field", help="JSON/JSONL field or CSV column holding the prompt text")
    p.add_argument("--limit", type=int, help="keep at most N prompts (pairs for paired sets) per group")
    p.add_argument("--seed", type=int, default=0, help="seed for --limit sampling (default 0)")
    p.add_argument("--categories", help="comma-separated categories to keep")
    p.add_argument("--keep-duplicates", action="store_true", help="do not drop duplicate prompts")
    p.add_argument("--truncate", action="store_true",
                   help="drop tokens from the start of a prompt longer than the model's context (default: refuse it "
                        "with an error)")


def prompt_set(args: argparse.Namespace) -> PromptSet:
    from ..prompts import resolve_prompts, select

    prompts = resolve_prompts(args.prompts, text_field=args.text_field)
    return select(prompts, limit=args.limit, seed=args.seed, categories=split(args.categories),
                  dedupe=not args.keep_duplicates)


# Generation ---------------------------------------------------------------------------------

def add_thinking(p: argparse.ArgumentParser, budget: bool = True) -> None:
    from ..models.thinking import DEFAULT_THINKING_BUDGET

    p.add_argument("--thinking", default="auto", choices=["auto", "on", "off"],
                   help="reasoning models (a <think> block before the answer): auto (the chat template's default), "
                        "on or off (the template's thinking switch); on is an error for a model that cannot think, "
                        "off a no-op for one that never does (default auto)")
    if budget:
        p.add_argument("--thinking-budget", type=int, default=DEFAULT_THINKING_BUDGET,
                       help=f"tokens added to --max-tokens when the model thinks first (default "
                            f"{DEFAULT_THINKING_BUDGET})")


def add_generation(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 disables (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--ignore-end-tokens", action="store_true", help="keep generating past end-of-turn")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--truncate", action="store_true",
                   help="fit a prompt longer than the model's context by dropping the oldest turns, then tokens from "
                        "the start of the prompt (default: refuse it with an error)")
    add_thinking(p)


def generation(args: argparse.Namespace) -> GenerationConfig:
    from ..models import GenerationConfig

    config = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              ignore_end_tokens=args.ignore_end_tokens, truncate=args.truncate,
                              thinking=args.thinking, thinking_budget=args.thinking_budget)
    config.validate()
    return config


# Steering: flags from the MODES table -------------------------------------------------------

def add_steering(p: argparse.ArgumentParser, default_mode: str = "auto") -> None:
    from ..steering import MODES
    from ..steering.modes import GATE_LEVEL

    modes = "; ".join(f"{name}: {spec.summary}" for name, spec in MODES.items())
    p.add_argument("--mode", default=default_mode, choices=list(MODES),
                   help=f"steering mode (default {default_mode}). {modes}")
    p.add_argument("--scale", type=float, default=None,
                   help="steering strength s (default: the mode's, 1.0; auto: the stored configuration's)")
    p.add_argument("--layers", help="target layers, 0-based: 1,2,3 or 4-10 (default: the mode's default)")
    p.add_argument("--site", help="hooked site: resid_pre, resid_post, attn_out, mlp_out")
    p.add_argument("--direction-layer", type=int, help="use this layer's direction at every hooked layer")
    p.add_argument("--direction-source", help="prompt set or saved directions folder the directions come from")
    p.add_argument("--steer-categories", dest="steer_categories",
                   help="directions from these categories only (comma-separated)")
    for name, spec in MODES.items():
        for param in spec.params:
            p.add_argument(param.flag, dest=param.name, type=int if param.integer else float, default=None,
                           help=f"{name}: {param.help} (default {param.default:g})")
    add_direction_variant(p)
    p.add_argument("--gate-layer", type=int,
                   help="steer only prompts whose last token projects above --gate-level at this layer's input "
                        "(at every hooked layer, for the whole answer; the other prompts stay untouched)")
    p.add_argument("--gate-level", type=float, default=GATE_LEVEL.default,
                   help=f"{GATE_LEVEL.help} (default {GATE_LEVEL.default:g})")
    p.add_argument("--config", help="a steering configuration JSON (from optimize or export --format vectors)")


def add_direction_variant(p: argparse.ArgumentParser) -> None:
    from ..analysis.directions import VARIANTS
    from ..steering.modes import BENIGN_COMPONENTS

    p.add_argument("--direction-variant", choices=list(VARIANTS), default=None,
                   help="how directions are computed (default mean_diff): " + "; ".join(
                       f"{name}: {text}" for name, text in VARIANTS.items()))
    p.add_argument(BENIGN_COMPONENTS.flag, dest=BENIGN_COMPONENTS.name, type=int, default=None,
                   help=f"{BENIGN_COMPONENTS.help} (default {BENIGN_COMPONENTS.default:g})")


def direction_variant(args: argparse.Namespace) -> tuple[str, int]:
    """(variant, benign components) the flags ask for, checked; the defaults where unset."""
    from ..steering.modes import BENIGN_COMPONENTS

    k = args.benign_components
    if k is not None:
        BENIGN_COMPONENTS.check(k)
    return args.direction_variant or "mean_diff", int(BENIGN_COMPONENTS.default) if k is None else k


def steering_request(args: argparse.Namespace, loaded: LoadedModel) -> SteeringConfig:
    """The steering the flags ask for, unresolved: ``auto`` stays, an unset scale stays None."""
    from dataclasses import replace

    from ..activations import parse_layers
    from ..steering import PARAMS, SteeringConfig

    if getattr(args, "config", None):
        config = SteeringConfig.load(args.config)
        return config if args.scale is None else replace(config, scale=args.scale)
    params = {name: getattr(args, name) for name in PARAMS if getattr(args, name, None) is not None}
    categories = getattr(args, "steer_categories", None) or getattr(args, "categories", None)
    return SteeringConfig(
        mode=args.mode, scale=args.scale,
        layers=parse_layers(args.layers, loaded.adapter.n_layers) if args.layers else None,
        site=args.site, categories=split(categories), direction_layer=args.direction_layer,
        gate_layer=args.gate_layer, gate_level=args.gate_level, source=args.direction_source,
        direction_variant=getattr(args, "direction_variant", None) or "mean_diff", **params)


def steering_config(args: argparse.Namespace, loaded: LoadedModel) -> SteeringConfig:
    """The steering the flags ask for, resolved: the stored configuration for ``auto``, defaults filled in."""
    from ..api import resolve_config

    return resolve_config(loaded, steering_request(args, loaded))


# Judge --------------------------------------------------------------------------------------

def add_judge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", help="labels answers refusal / evasion / compliance: markers (keyword rule, default), "
                                   "a judge model (builtin name, local folder, .gguf file or hub id), relevance:MODEL "
                                   "(evasion when the request explains little of the answer), or markers+X "
                                   "(markers first, then X for what they call compliance)")
    p.add_argument("--judge-url", help="judge with an OpenAI-compatible server instead (base URL, e.g. "
                                       "http://127.0.0.1:8000/v1; API key from $ALIGNMENT_ARTIFACTS_API_KEY or "
                                       "$OPENAI_API_KEY)")
    p.add_argument("--judge-model", help="model name at --judge-url (default: the only model the server lists)")


def judge(args: argparse.Namespace, loaded: LoadedModel | None = None, batch_size: int = 16) -> Judge:
    """The judge the flags name; a judge model that is ``loaded`` reuses it (never under steering)."""
    from ..judge import load_judge

    return load_judge(args.judge, url=args.judge_url, model_name=args.judge_model, reuse=loaded,
                      device=args.device, dtype=args.dtype, batch_size=batch_size)

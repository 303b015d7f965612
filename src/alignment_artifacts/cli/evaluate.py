"""Measuring and choosing a steering: ``evaluate``, ``judge calibrate``, ``optimize``.

Each command's flags come first (``add_*``), then the command (``cmd_*``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .common import (
    add_common,
    add_judge,
    add_model,
    add_steering,
    add_thinking,
    emit,
    judge,
    load,
    log,
    split,
    steering_config,
)

if TYPE_CHECKING:
    from ..evaluation import EvaluationSettings
    from ..models import LoadedModel


def add_evaluate(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_steering(p, default_mode="none")
    p.add_argument("--harmful", default="harmful", help="harmful prompt set (builtin name or file)")
    p.add_argument("--borderline", default="borderline:val",
                   help="borderline set; its label-0 prompts, safe ones that sound sensitive, are used "
                        "(default borderline:val)")
    p.add_argument("--ordinary", "--harmless", dest="ordinary", default="ordinary:val",
                   help="ordinary prompt set (default ordinary:val, 240 plain instructions)")
    p.add_argument("--groups", default="harmful,borderline,ordinary,capability",
                   help="groups to measure, comma-separated (default all four: harmful,borderline,ordinary,capability)")
    p.add_argument("--n-harmful", type=int, default=None, help="use the first N harmful prompts")
    p.add_argument("--n-borderline", type=int, default=None, help="use the first N borderline prompts")
    p.add_argument("--n-ordinary", "--n-harmless", dest="n_ordinary", type=int, default=None,
                   help="use the first N ordinary prompts")
    p.add_argument("--n-capability", type=int, default=300, help="capability tasks (default 300)")
    p.add_argument("--judged-borderline", type=int, default=None,
                   help="generate and judge only the first N borderline answers (over-refusal); KL uses all")
    p.add_argument("--judged-ordinary", type=int, default=None,
                   help="generate and judge only the first N ordinary answers (over-refusal); KL uses all")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per answer (default 48)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per scoring batch (default 16)")
    p.add_argument("--generation-batch-size", type=int, default=128,
                   help="prompts decoding together (default 128; lower it if memory is short)")
    add_thinking(p)
    add_judge(p)
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--baseline-model", help="unmodified model to compare with (default: the model itself, or the "
                                            "base model recorded in an exported folder)")
    p.add_argument("--endpoint", help="measure the model served at this OpenAI-compatible base URL (vLLM, llama.cpp's "
                                      "server, Ollama, serve; e.g. http://127.0.0.1:8000/v1) against --model "
                                      "unmodified; API key from $ALIGNMENT_ARTIFACTS_API_KEY or $OPENAI_API_KEY")
    p.add_argument("--endpoint-model", help="model name at --endpoint (default: the only one the server lists)")
    p.add_argument("--baseline-endpoint", help="compare with the model served here instead of --model (e.g. the "
                                               "base model, when --endpoint serves an export)")
    p.add_argument("--baseline-endpoint-model", help="model name at --baseline-endpoint (default: the only one listed)")
    p.add_argument("--endpoint-concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--endpoint-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--endpoint-retries", type=int, default=4,
                   help="retries of a failed request, with backoff from 0.5 s doubling (default 4)")
    p.add_argument("--endpoint-top-logprobs", type=int, default=20,
                   help="top log-probs asked for the first answer token, for an approximate KL (default 20; 0: do "
                        "not ask)")
    p.add_argument("--endpoint-body", help="extra JSON fields for every request, e.g. '{\"repeat_penalty\": 1.0}' "
                                           "(llama-cpp-python's server penalises repeats unless told not to)")
    add_common(p)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation import EvaluationSettings, evaluate, format_table

    settings = EvaluationSettings(harmful=args.harmful, borderline=args.borderline, ordinary=args.ordinary,
                                  groups=tuple(split(args.groups) or ()), n_harmful=args.n_harmful,
                                  n_borderline=args.n_borderline, n_ordinary=args.n_ordinary,
                                  n_capability=args.n_capability, judged_borderline=args.judged_borderline,
                                  judged_ordinary=args.judged_ordinary, max_tokens=args.max_tokens,
                                  batch_size=args.batch_size, generation_batch_size=args.generation_batch_size,
                                  thinking=args.thinking, thinking_budget=args.thinking_budget)
    if args.endpoint or args.baseline_endpoint:
        result = _evaluate_endpoint(args, settings)
    else:
        loaded = load(args)
        config = steering_config(args, loaded)
        reference = _reference_model(args)
        result = evaluate(loaded, config, settings, progress=not args.json, reference=reference,
                          judge=judge(args, reference or loaded))
    if args.plot:
        from ..evaluation import plot_evaluation

        plot_evaluation(result, args.plot)
    emit(args, result.to_json(), format_table(result))
    return 0


def _evaluate_endpoint(args: argparse.Namespace, settings: EvaluationSettings) -> Any:
    """A served model against the local --model (unmodified) or against --baseline-endpoint."""
    from dataclasses import replace

    from ..evaluation import EndpointSettings, evaluate_endpoint

    if not args.endpoint:
        raise UserError("--baseline-endpoint is the before side of an endpoint evaluation; pass --endpoint URL too.")
    if args.thinking != "auto":
        raise UserError("--thinking applies to local models. For a served model, pass the template switch in the "
                        "request, e.g. --endpoint-body '{\"chat_template_kwargs\": {\"enable_thinking\": false}}' "
                        "(vLLM, SGLang).")
    if args.mode != "none" or args.config or args.baseline_model:
        raise UserError("--endpoint measures the served model as it is: steering options (--mode, --config) and "
                        "--baseline-model apply to local models. The before side is --model, or "
                        "--baseline-endpoint URL; to steer the toolkit's own server, start `serve` with --mode.")
    endpoint = EndpointSettings(url=args.endpoint, model=args.endpoint_model, concurrency=args.endpoint_concurrency,
                                timeout=args.endpoint_timeout, retries=args.endpoint_retries,
                                top_logprobs=args.endpoint_top_logprobs, extra=_json_object(args.endpoint_body))
    endpoint.validate()
    progress = not args.json
    if args.baseline_endpoint:
        baseline = replace(endpoint, url=args.baseline_endpoint, model=args.baseline_endpoint_model,
                           option="--baseline-endpoint")
        baseline.validate()
        return evaluate_endpoint(endpoint, settings, baseline=baseline, judge=judge(args), progress=progress)
    reference = load(args)
    return evaluate_endpoint(endpoint, settings, reference=reference, judge=judge(args, reference),
                             progress=progress)


def _json_object(text: str | None) -> dict[str, Any]:
    """--endpoint-body as the fields it adds to every request."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--endpoint-body must be a JSON object, e.g. '{{\"repeat_penalty\": 1.0}}' (got {text}).")
    return value


def _reference_model(args: argparse.Namespace) -> LoadedModel | None:
    """The unmodified model to compare against: --baseline-model, or an export's recorded base model."""
    from ..api import get_model
    from ..export import EXPORT_MANIFEST

    name = args.baseline_model
    manifest = Path(args.model) / EXPORT_MANIFEST
    if name is None and manifest.is_file():
        base = json.loads(manifest.read_text())["base_model"]
        name = base["name"] if base.get("kind") == "builtin" else base["source"]
        log(args, f"comparing with the export's base model {name} (override with --baseline-model)")
    if name is None:
        return None
    return get_model(name, device=args.device, dtype=args.dtype)


def add_judge_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["calibrate"], help="calibrate: accuracy, confusion and Cohen's kappa of the "
                                                         "judge and of markers")
    add_judge(p)
    p.add_argument("--items", help="calibration file (default: the bundled judge_calibration.json)")
    p.add_argument("--batch-size", type=int, default=16, help="answers per judge batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--device", default="auto", help="judge model's device: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="judge model's dtype: auto (float32 on CPU), float32, bfloat16, "
                                                   "float16")
    add_common(p)


def cmd_judge(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..judge import calibrate
    from ..judge.calibrate import format_calibration
    from ..prompts import load_calibration

    items = load_calibration(args.items)
    labeller = judge(args, batch_size=args.batch_size)
    with tqdm(total=len(items), desc="judge", unit="answer", disable=args.json, leave=False) as bar:
        result = calibrate(labeller, items, seed=args.seed, progress=bar)
    emit(args, result.to_json(), format_calibration(result))
    return 0


def add_optimize(p: argparse.ArgumentParser) -> None:
    from ..analysis.directions import VARIANTS
    from ..optimize.search import DEFAULT_MODES, SEARCH_MODES

    add_model(p)
    p.add_argument("--trials", type=int, default=60, help="maximum trials (default 60)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="total time budget in seconds, checks and validation included (default 1800)")
    p.add_argument("--resume", action="store_true", help="continue the stored study")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--harmful", default="harmful", help="harmful prompt set (split into train and validation)")
    p.add_argument("--harmless", default="harmless", help="ordinary side of the direction")
    p.add_argument("--ordinary", default="ordinary", help="ordinary set: train split scores trials, val checks")
    p.add_argument("--borderline", default="borderline", help="borderline set: train split scores, val checks")
    p.add_argument("--max-kl", type=float, default=0.1,
                   help="finalists come from below this screening cost: ordinary KL + borderline collateral KL")
    p.add_argument("--finalists", type=int, default=3, help="Pareto points checked on validation (default 3)")
    p.add_argument("--n-ordinary", type=int, default=200,
                   help="ordinary validation prompts each finalist's KL is measured on (default 200)")
    p.add_argument("--n-borderline", type=int, default=None,
                   help="borderline validation prompts per check (default: the whole validation split)")
    p.add_argument("--n-capability", type=int, default=200, help="capability tasks per check (default 200)")
    p.add_argument("--judged-borderline", type=int, default=64,
                   help="borderline answers generated and judged per check (default 64)")
    p.add_argument("--judged-ordinary", type=int, default=48,
                   help="ordinary answers generated and judged per check (default 48)")
    add_judge(p)
    p.add_argument("--max-tokens", type=int, default=48,
                   help="tokens generated per answer when finalists are checked (default 48)")
    p.add_argument("--direction-prompts", help="prompt set the direction is computed on (default: the part of the "
                                               "training split the search does not score; validation stays unseen)")
    p.add_argument("--search-size", type=int, default=32,
                   help="prompts of each kind that score every trial (default 32; at most half the training split)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"modes to search, comma-separated, of {', '.join(SEARCH_MODES)} (default "
                        f"{','.join(DEFAULT_MODES)}: a clamp's evasions pass the refusal proxy and the judge, see "
                        "docs/evaluation.md; ablate and/or ablate_weight_norm alone, with --no-gate, keep the result "
                        "bakeable into weights for `export --format hf`)")
    p.add_argument("--direction-variants", default="mean_diff",
                   help=f"direction variants to search, comma-separated, of {', '.join(VARIANTS)} (default "
                        "mean_diff; each is computed once on the direction prompts; the stored configuration "
                        "records the chosen one)")
    p.add_argument("--no-gate", action="store_true",
                   help="do not search per-prompt gates (a gate steers only prompts that project past a level at one "
                        "layer; prompts below it stay untouched; searched in front of the plain recipe, so only when "
                        "ablate is among --modes)")
    p.add_argument("--screen-dtype", default="auto",
                   help="dtype of the screening passes: auto (bfloat16 on CPUs that multiply it natively), model, "
                        "or float32/bfloat16/float16; validation always runs in the model's dtype")
    add_thinking(p)
    add_common(p)


def cmd_optimize(args: argparse.Namespace) -> int:
    from ..optimize import OptimizeSettings, check_settings, optimize
    from ..optimize.search import DEFAULT_MODES

    settings = OptimizeSettings(trials=args.trials, timeout=args.timeout, resume=args.resume, seed=args.seed,
                                harmful=args.harmful, harmless=args.harmless, max_kl=args.max_kl,
                                direction_prompts=args.direction_prompts, search_size=args.search_size,
                                modes=split(args.modes) or list(DEFAULT_MODES), screen_dtype=args.screen_dtype,
                                direction_variants=split(args.direction_variants) or ["mean_diff"],
                                gate=not args.no_gate, ordinary=args.ordinary, borderline=args.borderline,
                                finalists=args.finalists, max_tokens=args.max_tokens, thinking=args.thinking,
                                n_val_ordinary=args.n_ordinary, n_val_borderline=args.n_borderline,
                                n_capability=args.n_capability, judged_borderline=args.judged_borderline,
                                judged_ordinary=args.judged_ordinary,
                                thinking_budget=args.thinking_budget)
    check_settings(settings)  # a misspelt mode or variant fails now, not after the model has loaded
    loaded = load(args)
    result = optimize(loaded, settings, progress=not args.json, judge=judge(args, loaded))
    emit(args, result.to_json(), result.summary())
    return 0

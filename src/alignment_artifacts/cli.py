"""The ``alignment-artifacts`` command: a thin layer over the API, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError

Handler = Callable[[argparse.Namespace], int]
_HANDLERS: dict[str, Handler] = {}


def _emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print JSON under --json, else the human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)


def _log(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "json", False) or getattr(args, "verbose", False):
        print(message, file=sys.stderr, flush=True)


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        return fn

    return register


# Options shared by several subcommands ---------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="print timings and progress details")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--cache-dir", help="cache root (default ~/.cache/alignment-artifacts or "
                                       "$ALIGNMENT_ARTIFACTS_CACHE)")


def _add_model(p: argparse.ArgumentParser) -> None:
    from .models import BUILTINS, DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"builtin name ({', '.join(BUILTINS)}), local folder, .gguf file or hub id "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--quantization", choices=["bnb-4bit", "bnb-8bit"], help="bitsandbytes loading (CUDA only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--offload-folder", help="dispatch the model with accelerate (GPUs, then CPU RAM) and offload "
                                            "what does not fit to this folder")


def _add_prompts(p: argparse.ArgumentParser, default: str = "pairs") -> None:
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


def _add_thinking(p: argparse.ArgumentParser, budget: bool = True) -> None:
    from .models.thinking import DEFAULT_THINKING_BUDGET

    p.add_argument("--thinking", default="auto", choices=["auto", "on", "off"],
                   help="reasoning models (a <think> block before the answer): auto (the chat template's default), "
                        "on or off (the template's thinking switch); on is an error for a model that cannot think, "
                        "off a no-op for one that never does (default auto)")
    if budget:
        p.add_argument("--thinking-budget", type=int, default=DEFAULT_THINKING_BUDGET,
                       help=f"tokens added to --max-tokens when the model thinks first (default "
                            f"{DEFAULT_THINKING_BUDGET})")


def _add_generation(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
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
    _add_thinking(p)


def _add_steering(p: argparse.ArgumentParser, default_mode: str = "auto") -> None:
    from .analysis.directions import VARIANTS
    from .steering import MODES
    from .steering.modes import BENIGN_COMPONENTS, GATE_LEVEL

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
    p.add_argument("--direction-variant", choices=list(VARIANTS), default=None,
                   help="how directions are computed (default mean_diff): " + "; ".join(
                       f"{name}: {text}" for name, text in VARIANTS.items()))
    p.add_argument(BENIGN_COMPONENTS.flag, dest=BENIGN_COMPONENTS.name, type=int, default=None,
                   help=f"{BENIGN_COMPONENTS.help} (default {BENIGN_COMPONENTS.default:g})")
    p.add_argument("--gate-layer", type=int,
                   help="steer only prompts whose last token projects above --gate-level at this layer's input "
                        "(at every hooked layer, for the whole answer; the other prompts stay untouched)")
    p.add_argument("--gate-level", type=float, default=GATE_LEVEL.default,
                   help=f"{GATE_LEVEL.help} (default {GATE_LEVEL.default:g})")
    p.add_argument("--config", help="a steering configuration JSON (from optimize or export --format vectors)")


def _add_judge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", help="labels answers refusal / evasion / compliance: markers (keyword rule, default), "
                                   "a judge model (builtin name, local folder, .gguf file or hub id), or markers+X "
                                   "(markers first, then X for what they call compliance)")
    p.add_argument("--judge-url", help="judge with an OpenAI-compatible server instead (base URL, e.g. "
                                       "http://127.0.0.1:8000/v1; API key from $ALIGNMENT_ARTIFACTS_API_KEY or "
                                       "$OPENAI_API_KEY)")
    p.add_argument("--judge-model", help="model name at --judge-url (default: the only model the server lists)")


def _judge(args: argparse.Namespace, loaded: Any) -> Any:
    """The judge the flags name; a model judge that is the loaded model reuses it (never under steering)."""
    from .judge import load_judge

    model = (args.judge or "").removeprefix("markers+")
    same = model in (args.model, getattr(loaded.info, "name", None))
    return load_judge(args.judge, url=args.judge_url, model_name=args.judge_model, loaded=loaded if same else None,
                      device=args.device, dtype=args.dtype)


def _read_json(path: str, option: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {option} {path}: {exc}. Pass a file written by `evaluate --json`.") from None


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _steering_request(args: argparse.Namespace, loaded: Any) -> Any:
    """The steering the flags ask for, unresolved: ``auto`` stays, an unset scale stays None."""
    from dataclasses import replace

    from .activations import parse_layers
    from .steering import PARAMS, SteeringConfig

    if getattr(args, "config", None):
        config = SteeringConfig.load(args.config)
        return config if args.scale is None else replace(config, scale=args.scale)
    params = {name: getattr(args, name) for name in PARAMS if getattr(args, name, None) is not None}
    return SteeringConfig(
        mode=args.mode, scale=args.scale,
        layers=parse_layers(args.layers, loaded.adapter.n_layers) if args.layers else None,
        site=args.site, categories=_split(getattr(args, "steer_categories", None) or getattr(args, "categories",
                                                                                            None)),
        direction_layer=args.direction_layer, gate_layer=args.gate_layer, gate_level=args.gate_level,
        source=args.direction_source, direction_variant=getattr(args, "direction_variant", None) or "mean_diff",
        **params)


def _steering_config(args: argparse.Namespace, loaded: Any) -> Any:
    from .api import resolve_config

    return resolve_config(loaded, _steering_request(args, loaded))


def _load(args: argparse.Namespace) -> Any:
    from .api import get_model

    started = time.perf_counter()
    loaded = get_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                       trust_remote_code=args.trust_remote_code, offload_folder=args.offload_folder)
    if getattr(args, "verbose", False):
        print(f"loaded {loaded.info.name} in {time.perf_counter() - started:.2f} s ({loaded.info.dtype}, "
              f"{loaded.info.device}, {loaded.info.n_layers} layers, hidden {loaded.info.hidden_size})",
              file=sys.stderr)
    return loaded


def _prompt_set(args: argparse.Namespace) -> Any:
    from .prompts import resolve_prompts, select

    prompt_set = resolve_prompts(args.prompts, text_field=args.text_field)
    return select(prompt_set, limit=args.limit, seed=args.seed, categories=_split(args.categories),
                  dedupe=not args.keep_duplicates)


def _generation(args: argparse.Namespace) -> Any:
    from .models import GenerationConfig

    config = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              ignore_end_tokens=args.ignore_end_tokens, truncate=args.truncate,
                              thinking=args.thinking, thinking_budget=args.thinking_budget)
    config.validate()
    return config


# Subcommands --------------------------------------------------------------------------------

@_command("models")
def cmd_models(args: argparse.Namespace) -> int:
    from .models import BUILTINS, builtin_status

    if args.families:
        from .models.adapter import NOT_SUPPORTED, families

        rows, missing = families(), [{"families": f, "why": why} for f, why in NOT_SUPPORTED]
        lines = [f"{r['model_type']:12} {r['kind']:5} bake {r['bake']}"
                 + "".join(f"\n{'':18} {x}" for x in (r["experts"] and f"experts: {r['experts']}", r["notes"]) if x)
                 for r in rows]
        lines += ["", f"sites (every family): {', '.join(rows[0]['sites'])}", "not supported:"]
        lines += [f"  {m['families']}: {m['why']}" for m in missing]
        _emit(args, {"families": rows, "not_supported": missing}, "\n".join(lines))
        return 0
    rows = [builtin_status(m) for m in BUILTINS.values()]
    lines = [f"{'name':32} {'installed':9} {'cached':6} {'GGUF MB':>8} {'layers':>6} {'hidden':>6}  notes"]
    for r in rows:
        note = ("default; " if r["default"] else "") + ("refuses harmful requests" if r["refuses_harmful"]
                                                        else "does not refuse (mechanics)")
        lines.append(f"{r['name']:32} {'yes' if r['installed'] else 'no':9} {'yes' if r['cached'] else 'no':6} "
                     f"{r['gguf_bytes'] / 1e6:8.0f} {r['layers']:6} {r['hidden_size']:6}  {note}")
    missing = [r for r in rows if not r["installed"]]
    for r in missing:
        lines.append(f"install {r['name']}: {r['install']}")
    _emit(args, {"models": rows}, "\n".join(lines))
    return 0


@_command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from .api import check_prompt
    from .models import generate
    from .models.thinking import thinking_format

    prompt = check_prompt(args.prompt)
    loaded = _load(args)
    config = _generation(args)
    stream = not args.json and not args.no_stream
    started = time.perf_counter()
    out = generate(loaded, [prompt], config, system=args.system, stream=stream)
    elapsed = time.perf_counter() - started
    if stream:
        print()
    tokens = len(out.tokens[0])
    split = thinking_format(loaded.tokenizer, config.thinking, config.thinking_budget).split(out.texts[0])
    _emit(args, {"model": loaded.info.name, "prompt": prompt, "answer": split.answer, "thinking": split.thinking,
                 "thinking_finished": split.finished, "tokens": tokens,
                 "seconds": round(elapsed, 2), "load_seconds": loaded.info.load_seconds},
          None if stream else out.texts[0])
    if args.verbose:
        print(f"{tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tok/s); model load "
              f"{loaded.info.load_seconds:.2f} s", file=sys.stderr)
    return 0


@_command("prompts")
def cmd_prompts(args: argparse.Namespace) -> int:
    from .prompts import BUILTIN_SETS, load_builtin, validate_pairs_file

    if args.action == "validate":
        if not args.file:
            raise UserError("Usage: alignment-artifacts prompts validate FILE")
        problems = validate_pairs_file(args.file)
        _emit(args, {"file": args.file, "valid": not problems, "problems": problems},
              "valid" if not problems else "\n".join(f"- {p}" for p in problems))
        return 0 if not problems else 1
    rows = []
    for name, description in BUILTIN_SETS.items():
        ps = load_builtin(name)
        rows.append({"name": name, "description": description, "prompts": len(ps),
                     "categories": sorted({p.category for p in ps.prompts if p.category})})
    _emit(args, {"sets": rows}, "\n".join(f"{r['name']:14} {r['prompts']:5} prompts  {r['description']}"
                                          for r in rows))
    return 0


@_command("collect")
def cmd_collect(args: argparse.Namespace) -> int:
    from .activations import collect_activations

    loaded = _load(args)
    prompt_set = _prompt_set(args)
    started = time.perf_counter()
    store = collect_activations(loaded, prompt_set, sites=args.sites, positions=args.positions, layers=args.layers,
                                dtype=args.activation_dtype, batch_size=args.batch_size, system=args.system,
                                use_cache=not args.no_cache, progress=not args.json, truncate=args.truncate,
                                thinking=args.thinking)
    elapsed = time.perf_counter() - started
    m = store.manifest
    resumed = not store.cache_hit and bool(m.get("resumed"))
    total = elapsed + (m.get("earlier_seconds", 0.0) if resumed else 0.0)  # plus the interrupted runs' time
    summary = {"cache_hit": store.cache_hit, "resumed": resumed, "seconds": round(total, 2),
               "seconds_this_run": round(elapsed, 2), "path": str(store.path),
               "model": loaded.info.name, "prompts": len(store.prompts), "sites": store.sites,
               "positions": store.positions, "layers": [store.layers[0], store.layers[-1]], "dtype": m["dtype"],
               "bytes_per_prompt": m["bytes_per_prompt"],
               "full_capture_bytes_per_prompt": m["full_capture_bytes_per_prompt"],
               "storage_ratio_vs_full_mlp_capture": m["storage_ratio_vs_full_mlp_capture"]}
    done = "cache hit" if store.cache_hit else "resumed and collected" if resumed else "collected"
    took = f"{total:.1f} s ({elapsed:.1f} s in this run)" if resumed else f"{elapsed:.1f} s"
    text = (f"{done}: {len(store.prompts)} prompts, sites "
            f"{','.join(store.sites)}, positions {','.join(store.positions)}, layers {store.layers[0]}-"
            f"{store.layers[-1]} in {took}\nstored at {store.path}\nstorage: {m['bytes_per_prompt']:.0f} "
            f"bytes/prompt; capturing every token of every layer's MLP output would take "
            f"{m['full_capture_bytes_per_prompt']:.0f} bytes/prompt (ratio "
            f"{m['storage_ratio_vs_full_mlp_capture']:.4f})")
    _emit(args, summary, text)
    return 0


def _analysis(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .activations import collect_activations
    from .analysis import analyze

    loaded = _load(args)
    prompt_set = _prompt_set(args)
    store = collect_activations(loaded, prompt_set, sites=[args.site], positions=[args.position],
                                layers=args.layers, progress=not args.json, truncate=args.truncate,
                                thinking=args.thinking)
    result = analyze(store, site=args.site, position=args.position, n_permutations=args.permutations,
                     n_bootstrap=args.bootstrap, folds=args.folds, seed=args.seed, progress=not args.json)
    return loaded, store, result


def _analysis_folder(args: argparse.Namespace, store: Any) -> Path:
    from .cache import cache_dir

    return Path(args.out) if args.out else cache_dir("analysis", store.manifest["key"])


@_command("analyze")
def cmd_analyze(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    loaded, store, result = _analysis(args)
    folder = result.save(_analysis_folder(args, store))
    data = result.to_json()
    data["output_folder"] = str(folder)
    data["seconds"] = round(time.perf_counter() - started, 2)
    recommended = data.get("recommended_layers")
    text = (f"analysis of {loaded.info.name} on {store.manifest['prompt_set_name']} ({len(store.prompts)} prompts) "
            f"in {data['seconds']:.1f} s\nrecommended layers: {recommended}\nresults: {folder}/results.json, "
            f"{folder}/results.csv, figures in {folder}/figures")
    _emit(args, data, text)
    return 0


@_command("report")
def cmd_report(args: argparse.Namespace) -> int:
    from .analysis import write_report

    _, store, result = _analysis(args)
    folder = result.save(_analysis_folder(args, store) if not args.out else Path(args.out).with_suffix(""))
    command = "alignment-artifacts " + " ".join(sys.argv[1:]) if sys.argv else "alignment-artifacts report"
    evaluations = [_read_json(path, "--evaluation") for path in args.evaluation or []]
    path = write_report(folder, args.report_out, command, evaluations)
    _emit(args, {"report": str(path), "results": str(folder)}, f"report written to {path}")
    return 0


@_command("suppress")
def cmd_suppress(args: argparse.Namespace) -> int:
    from .api import check_prompt, suppress_prompt

    prompt = check_prompt(args.prompt)
    loaded = _load(args)
    write = None if args.json else _write_stdout
    result = suppress_prompt(prompt, loaded, config=_steering_request(args, loaded), compare=not args.no_compare,
                             system=args.system, generation=_generation(args), write=write, progress=not args.json)
    counts = result.interventions
    if write is not None:
        print(f"interventions: {sum(counts.values())} positions changed across {len(counts)} hooked sites")
    _emit(args, {"model": loaded.info.name, "prompt": prompt, "baseline": result.baseline, "steered": result.steered,
                 "config": result.config, "interventions": counts})
    return 0


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@_command("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    import contextlib
    from dataclasses import replace

    from .api import resolve_config, resolve_steering
    from .models import generate
    from .steering import MODES

    loaded = _load(args)
    config = _steering_config(args, loaded)
    generation = _generation(args)
    history: list[dict[str, str]] = []
    enabled = True
    print("Chat with steering. Commands: /mode MODE, /scale S, /off, /on, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input(f"[{config.mode if enabled else 'off'} {config.scale:g}] you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, value = line[1:].partition(" ")
            if command in ("quit", "exit"):
                return 0
            if command == "off":
                enabled = False
            elif command == "on":
                enabled = True
            elif command == "reset":
                history.clear()
            elif command == "mode" and value in MODES:
                config = resolve_config(loaded, replace(_steering_request(args, loaded), mode=value, scale=None))
            elif command == "scale":
                try:
                    config.scale = float(value)
                    config.validate(loaded.adapter.n_layers)
                except (ValueError, UserError) as exc:
                    print(f"bad scale: {exc}", file=sys.stderr)
            else:
                print(f"unknown command; modes: {', '.join(MODES)}", file=sys.stderr)
            continue
        steering = resolve_steering(loaded, config) if enabled else None
        print("model> ", end="", flush=True)
        try:
            with steering.apply(loaded) if steering is not None else contextlib.nullcontext():
                answer = generate(loaded, [line], generation, system=args.system, stream=True,
                                  history=history).texts[0]
        except UserError as exc:  # e.g. the conversation outgrew the context: keep the session
            print(f"\nerror: {exc} (/reset starts a new conversation)", file=sys.stderr)
            continue
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


@_command("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvaluationSettings, evaluate, format_table

    settings = EvaluationSettings(harmful=args.harmful, borderline=args.borderline, ordinary=args.ordinary,
                                  groups=tuple(_split(args.groups) or ()), n_harmful=args.n_harmful,
                                  n_borderline=args.n_borderline, n_ordinary=args.n_ordinary,
                                  n_capability=args.n_capability, judged_borderline=args.judged_borderline,
                                  judged_ordinary=args.judged_ordinary, max_tokens=args.max_tokens,
                                  batch_size=args.batch_size, generation_batch_size=args.generation_batch_size,
                                  thinking=args.thinking, thinking_budget=args.thinking_budget)
    if args.endpoint or args.baseline_endpoint:
        result = _evaluate_endpoint(args, settings)
    else:
        loaded = _load(args)
        config = _steering_config(args, loaded)
        reference = _reference_model(args, loaded)
        result = evaluate(loaded, config, settings, progress=not args.json, reference=reference,
                          judge=_judge(args, reference or loaded))
    if args.plot:
        from .evaluation import plot_evaluation

        plot_evaluation(result, args.plot)
    _emit(args, result.to_json(), format_table(result))
    return 0


def _evaluate_endpoint(args: argparse.Namespace, settings: Any) -> Any:
    """A served model against the local --model (unmodified) or against --baseline-endpoint."""
    from dataclasses import replace

    from .evaluation import EndpointSettings, evaluate_endpoint
    from .judge import load_judge

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
        judge = load_judge(args.judge, url=args.judge_url, model_name=args.judge_model, device=args.device,
                           dtype=args.dtype)
        return evaluate_endpoint(endpoint, settings, baseline=baseline, judge=judge, progress=progress)
    reference = _load(args)
    return evaluate_endpoint(endpoint, settings, reference=reference, judge=_judge(args, reference),
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


def _reference_model(args: argparse.Namespace, loaded: Any) -> Any:
    """The unmodified model to compare against: --baseline-model, or an export's recorded base model."""
    from .api import get_model
    from .export import EXPORT_MANIFEST

    name = args.baseline_model
    manifest = Path(args.model) / EXPORT_MANIFEST
    if name is None and manifest.is_file():
        base = json.loads(manifest.read_text())["base_model"]
        name = base["name"] if base.get("kind") == "builtin" else base["source"]
        _log(args, f"comparing with the export's base model {name} (override with --baseline-model)")
    if name is None:
        return None
    return get_model(name, device=args.device, dtype=args.dtype)


@_command("judge")
def cmd_judge(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .judge import calibrate, load_judge
    from .judge.calibrate import format_calibration
    from .prompts import load_calibration

    items = load_calibration(args.items)
    judge = load_judge(args.judge, url=args.judge_url, model_name=args.judge_model, device=args.device,
                       dtype=args.dtype, batch_size=args.batch_size)
    with tqdm(total=len(items), desc="judge", unit="answer", disable=args.json, leave=False) as bar:
        result = calibrate(judge, items, seed=args.seed, progress=bar)
    _emit(args, result.to_json(), format_calibration(result))
    return 0


@_command("optimize")
def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import OptimizeSettings, optimize

    loaded = _load(args)
    settings = OptimizeSettings(trials=args.trials, timeout=args.timeout, resume=args.resume, seed=args.seed,
                                harmful=args.harmful, harmless=args.harmless, max_kl=args.max_kl,
                                direction_prompts=args.direction_prompts, search_size=args.search_size,
                                modes=_split(args.modes) or ["clamp", "ablate"], screen_dtype=args.screen_dtype,
                                gate=not args.no_gate, ordinary=args.ordinary, borderline=args.borderline,
                                finalists=args.finalists, max_tokens=args.max_tokens, thinking=args.thinking,
                                thinking_budget=args.thinking_budget)
    result = optimize(loaded, settings, progress=not args.json, judge=_judge(args, loaded))
    _emit(args, result.to_json(), result.summary())
    return 0


@_command("export")
def cmd_export(args: argparse.Namespace) -> int:
    from .api import resolve_steering
    from .export import export

    loaded = _load(args)
    steering = resolve_steering(loaded, _steering_request(args, loaded), progress=not args.json)
    path = export(loaded, steering, args.out, format=args.format, force=args.force, gguf_type=args.gguf_type)
    _emit(args, {"format": args.format, "path": str(path), "config": steering.config.to_json()},
          f"exported {args.format} to {path}")
    return 0


@_command("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    from .api import resolve_steering
    from .serve import ServerLimits, serve

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (got {args.max_batch}); 1 serves one request at a time.")
    loaded = _load(args)
    config = _steering_config(args, loaded)

    def directions_for(request_config: Any, model_lock: Any) -> Any:
        return resolve_steering(loaded, request_config, progress=False, model_lock=model_lock).directions

    limits = ServerLimits(max_tokens=args.max_tokens_limit, request_timeout=args.request_timeout,
                          max_batch=args.max_batch)
    serve(loaded, config, directions_for, host=args.host, port=args.port, api_key=args.api_key, limits=limits)
    return 0


# Parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignment-artifacts",
        description="Measure and steer the directions that safety training leaves in a model's activations. "
                    "Layers are 0-based decoder-block indices everywhere.")
    parser.add_argument("--version", action="version", version=f"alignment-artifacts {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list builtin models with installed/cached status")
    p.add_argument("--families", action="store_true", help="list the supported model families (dense and "
                   "mixture-of-experts), what each supports, and what is not supported")
    _add_common(p)

    p = sub.add_parser("generate", help="answer a prompt with the plain model")
    p.add_argument("prompt", help="the user message")
    _add_model(p)
    _add_generation(p)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    _add_common(p)

    p = sub.add_parser("prompts", help="list builtin prompt sets or validate a prompt file")
    p.add_argument("action", choices=["list", "validate"], help="list builtin sets, or validate FILE")
    p.add_argument("file", nargs="?", help="prompt file to validate")
    _add_common(p)

    p = sub.add_parser("collect", help="collect pooled activations for a prompt set (cached, resumable)")
    _add_model(p)
    _add_prompts(p)
    p.add_argument("--sites", "--activation-filter", dest="sites", default="mlp_out",
                   help="sites: resid_pre, resid_post, attn_out, mlp_out, or 'all'; the original study's "
                        "filter names (mlp.output, attention) work too (default mlp_out)")
    p.add_argument("--positions", default="last",
                   help="last, post_instruction, mean, first_generated, post_think (first position after a "
                        "reasoning model's thinking block), generated:N (default last)")
    p.add_argument("--layers", default="all", help="layers to keep, 0-based: all, 1,2,3 or 4-10 (default all)")
    p.add_argument("--activation-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype (default float16)")
    p.add_argument("--batch-size", default="auto", help="prompts per forward pass, or auto (default)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-cache", action="store_true", help="recollect even when a cached store exists")
    _add_thinking(p, budget=False)
    _add_common(p)

    for name, help_text in (("analyze", "directions, effect sizes, held-out separability, permutation tests"),
                            ("report", "analysis as one self-contained HTML report")):
        p = sub.add_parser(name, help=help_text)
        _add_model(p)
        _add_prompts(p)
        p.add_argument("--site", default="mlp_out", help="site to analyse (default mlp_out)")
        p.add_argument("--position", default="last", help="position to analyse: last, post_instruction, mean, "
                                                           "first_generated, post_think (default last)")
        _add_thinking(p, budget=False)
        p.add_argument("--layers", default="all", help="layers, 0-based (default all)")
        p.add_argument("--permutations", type=int, default=1000, help="permutation-test resamples (default 1000)")
        p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs (default 2000)")
        p.add_argument("--folds", type=int, default=5, help="pair-aware cross-validation folds (default 5)")
        if name == "analyze":
            p.add_argument("--out", help="output folder (default: the cache's analysis folder)")
        else:
            p.add_argument("--out", dest="report_out", default="report.html", help="HTML file (default report.html)")
        _add_common(p)
        if name == "report":
            p.set_defaults(out=None)
            p.add_argument("--evaluation", action="append",
                           help="an `evaluate --json` output to include as a section (repeatable)")

    p = sub.add_parser("suppress", help="answer a prompt with and without steering, side by side")
    p.add_argument("prompt", help="the user message")
    _add_model(p)
    _add_steering(p)
    _add_generation(p)
    p.add_argument("--categories", help="directions from these categories only (comma-separated)")
    p.add_argument("--no-compare", action="store_true", help="skip the unmodified answer")
    _add_common(p)

    p = sub.add_parser("chat", help="interactive multi-turn chat with steering (/mode, /scale, /off, /on)")
    _add_model(p)
    _add_steering(p)
    _add_generation(p, max_tokens=256)
    _add_common(p)

    p = sub.add_parser("evaluate", help="four groups before and after: harmful, borderline, ordinary, capability")
    _add_model(p)
    _add_steering(p, default_mode="none")
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
    p.add_argument("--generation-batch-size", type=int, default=32, help="prompts per generation batch (default 32)")
    _add_thinking(p)
    _add_judge(p)
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
    _add_common(p)

    p = sub.add_parser("judge", help="calibrate a judge (refusal / evasion / compliance) on labelled answers")
    p.add_argument("action", choices=["calibrate"], help="calibrate: accuracy, confusion and Cohen's kappa of the "
                                                         "judge and of markers")
    _add_judge(p)
    p.add_argument("--items", help="calibration file (default: the bundled judge_calibration.json)")
    p.add_argument("--batch-size", type=int, default=16, help="answers per judge batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--device", default="auto", help="judge model's device: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="judge model's dtype: auto (float32 on CPU), float32, bfloat16, "
                                                   "float16")
    _add_common(p)

    p = sub.add_parser("optimize", help="search steering settings (Optuna, refusals vs KL) and store the best")
    _add_model(p)
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
    _add_judge(p)
    p.add_argument("--max-tokens", type=int, default=48,
                   help="tokens generated per answer when finalists are checked (default 48)")
    p.add_argument("--direction-prompts", help="prompt set the direction is computed on (default: the part of the "
                                               "training split the search does not score; validation stays unseen)")
    p.add_argument("--search-size", type=int, default=32,
                   help="prompts of each kind that score every trial (default 32; at most half the training split)")
    p.add_argument("--modes", default="clamp,ablate",
                   help="modes to search, comma-separated (default clamp,ablate; 'ablate' alone keeps the result "
                        "bakeable into weights for `export --format hf`)")
    p.add_argument("--no-gate", action="store_true",
                   help="do not search per-prompt gates for clamp (a gate steers only prompts that project past a "
                        "level at one layer; ordinary prompts below it stay untouched)")
    p.add_argument("--screen-dtype", default="auto",
                   help="dtype of the screening passes: auto (bfloat16 on CPUs that multiply it natively), model, "
                        "or float32/bfloat16/float16; validation always runs in the model's dtype")
    _add_thinking(p)
    _add_common(p)

    p = sub.add_parser("export", help="bake a configuration into weights, or write a control vector / vectors")
    _add_model(p)
    _add_steering(p)
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "gguf-control-vector", "vectors"],
                   help="hf (weights with the direction baked in), gguf (the same, rewritten from the model's "
                        "GGUF file), gguf-control-vector (llama.cpp), vectors")
    p.add_argument("--gguf-type", default="auto",
                   help="--format gguf: type of the rewritten tensors, auto (the source's where the gguf package "
                        "can write it, else Q8_0), or e.g. Q8_0, F16, F32")
    p.add_argument("--out", required=True, help="output folder or file")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    _add_common(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request steering")
    _add_model(p)
    _add_steering(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included, before it is cancelled with HTTP 504 "
                        "(default 600)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together in one batch (default 16); later ones join as rows free up")
    _add_common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from .cache import set_cache_root
    from .models.loading import quiet_transformers

    set_cache_root(getattr(args, "cache_dir", None))
    quiet_transformers()
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # a line for the user, no source
    try:
        return _HANDLERS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; finished work is cached and a rerun continues from there.", file=sys.stderr)
        return 130

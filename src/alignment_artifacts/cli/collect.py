"""The inputs and the measurement: ``models``, ``prompts``, ``collect``, ``analyze``, ``report``.

Each command's flags come first (``add_*``), then the command (``cmd_*``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .common import (
    add_common,
    add_direction_variant,
    add_model,
    add_prompts,
    add_thinking,
    direction_variant,
    emit,
    load,
    prompt_set,
)


def add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", action="store_true", help="list the supported model families (dense and "
                   "mixture-of-experts), what each supports, and what is not supported")
    add_common(p)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import BUILTINS, builtin_status

    if args.families:
        return _families(args)
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
    emit(args, {"models": rows}, "\n".join(lines))
    return 0


def _families(args: argparse.Namespace) -> int:
    from ..models.adapter import NOT_SUPPORTED, families

    rows, missing = families(), [{"families": f, "why": why} for f, why in NOT_SUPPORTED]
    lines = [f"{r['model_type']:12} {r['kind']:5} bake {r['bake']}"
             + "".join(f"\n{'':18} {x}" for x in (r["experts"] and f"experts: {r['experts']}", r["notes"]) if x)
             for r in rows]
    lines += ["", f"sites (every family): {', '.join(rows[0]['sites'])}", "not supported:"]
    lines += [f"  {m['families']}: {m['why']}" for m in missing]
    emit(args, {"families": rows, "not_supported": missing}, "\n".join(lines))
    return 0


def add_prompts_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "validate"], help="list builtin sets, or validate FILE")
    p.add_argument("file", nargs="?", help="prompt file to validate")
    add_common(p)


def cmd_prompts(args: argparse.Namespace) -> int:
    from ..prompts import BUILTIN_SETS, load_builtin, validate_pairs_file

    if args.action == "validate":
        if not args.file:
            raise UserError("Usage: alignment-artifacts prompts validate FILE")
        problems = validate_pairs_file(args.file)
        emit(args, {"file": args.file, "valid": not problems, "problems": problems},
             "valid" if not problems else "\n".join(f"- {p}" for p in problems))
        return 0 if not problems else 1
    rows = []
    for name, description in BUILTIN_SETS.items():
        ps = load_builtin(name)
        rows.append({"name": name, "description": description, "prompts": len(ps),
                     "categories": sorted({p.category for p in ps.prompts if p.category})})
    emit(args, {"sets": rows}, "\n".join(f"{r['name']:14} {r['prompts']:5} prompts  {r['description']}"
                                         for r in rows))
    return 0


def add_collect(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_prompts(p)
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
    add_thinking(p, budget=False)
    add_common(p)


def cmd_collect(args: argparse.Namespace) -> int:
    from ..activations import collect_activations

    loaded = load(args)
    prompts = prompt_set(args)
    started = time.perf_counter()
    store = collect_activations(loaded, prompts, sites=args.sites, positions=args.positions, layers=args.layers,
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
    emit(args, summary, text)
    return 0


# analyze and report: the same collection and analysis, saved as files or as one HTML page ----

def _add_analysis(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_prompts(p)
    p.add_argument("--site", default="mlp_out", help="site to analyse (default mlp_out)")
    p.add_argument("--position", default="last", help="position to analyse: last, post_instruction, mean, "
                                                       "first_generated, post_think (default last)")
    add_thinking(p, budget=False)
    p.add_argument("--layers", default="all", help="layers, 0-based (default all)")
    p.add_argument("--permutations", type=int, default=1000, help="permutation-test resamples (default 1000)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs (default 2000)")
    p.add_argument("--folds", type=int, default=5, help="pair-aware cross-validation folds (default 5)")
    p.add_argument("--method", default="mean", choices=["mean", "median"],
                   help="group centres of the saved directions and cosines: mean, or median (the geometric median "
                        "of each group, robust to outlying prompts; the statistics stay the mean difference's; not "
                        "--direction-variant median, the per-unit medians, and not combined with it) (default mean)")
    add_direction_variant(p)


def _analysis(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from ..activations import collect_activations
    from ..analysis import analyze

    variant, benign_components = direction_variant(args)
    loaded = load(args)
    store = collect_activations(loaded, prompt_set(args), sites=[args.site], positions=[args.position],
                                layers=args.layers, progress=not args.json, truncate=args.truncate,
                                thinking=args.thinking)
    result = analyze(store, site=args.site, position=args.position, n_permutations=args.permutations,
                     n_bootstrap=args.bootstrap, folds=args.folds, seed=args.seed, progress=not args.json,
                     method=args.method, variant=variant, benign_components=benign_components)
    return loaded, store, result


def _analysis_folder(args: argparse.Namespace, store: Any) -> Path:
    from ..cache import cache_dir

    if args.out:
        return Path(args.out)
    variant, k = direction_variant(args)  # a variant's analysis goes beside the plain one, not over it
    suffix = "" if variant == "mean_diff" else f"-{variant}" + (f"{k}" if variant == "benign_subspace" else "")
    suffix += "-geometric-median" if args.method == "median" else ""
    return cache_dir("analysis", store.manifest["key"] + suffix)


def add_analyze(p: argparse.ArgumentParser) -> None:
    _add_analysis(p)
    p.add_argument("--out", help="output folder (default: the cache's analysis folder)")
    add_common(p)


def cmd_analyze(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    loaded, store, result = _analysis(args)
    folder = result.save(_analysis_folder(args, store))
    data = result.to_json()
    data["output_folder"] = str(folder)
    data["seconds"] = round(time.perf_counter() - started, 2)
    recommended = data.get("recommended_layers")
    config = data["config"]
    variant = "" if config["direction_variant"] == "mean_diff" else (
        f"direction variant: {config['direction_variant']} (statistics of the {config['statistics_variant']} "
        "direction)\n")
    method = "" if config["method"] == "mean" else "group centres: geometric medians (statistics of the means)\n"
    text = (f"analysis of {loaded.info.name} on {store.manifest['prompt_set_name']} ({len(store.prompts)} prompts) "
            f"in {data['seconds']:.1f} s\n{variant}{method}recommended layers: {recommended}\nresults: "
            f"{folder}/results.json, {folder}/results.csv, figures in {folder}/figures")
    emit(args, data, text)
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    _add_analysis(p)
    p.add_argument("--out", dest="report_out", default="report.html", help="HTML file (default report.html)")
    add_common(p)
    p.set_defaults(out=None)
    p.add_argument("--evaluation", action="append",
                   help="an `evaluate --json` output to include as a section (repeatable)")


def cmd_report(args: argparse.Namespace) -> int:
    from ..analysis import write_report

    _, store, result = _analysis(args)
    folder = result.save(_analysis_folder(args, store))  # report's --out is the HTML file, not a folder
    command = "alignment-artifacts " + " ".join(sys.argv[1:]) if sys.argv else "alignment-artifacts report"
    evaluations = [_read_json(path, "--evaluation") for path in args.evaluation or []]
    path = write_report(folder, args.report_out, command, evaluations)
    emit(args, {"report": str(path), "results": str(folder)}, f"report written to {path}")
    return 0


def _read_json(path: str, option: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {option} {path}: {exc}. Pass a file written by `evaluate --json`.") from None

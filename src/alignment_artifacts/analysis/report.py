"""One self-contained HTML report of an analysis: figures inlined, no external resources.

Held-out numbers come first in every table because they are the honest ones; in-sample numbers
are shown, labelled, for comparison. The exact command that produced the run is included so the
report can be reproduced.
"""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..cache import atomic_write_bytes
from .figures import render_figures
from .result import AnalysisResult, load_result, package_version

_CAPTIONS = {
    "effect_size": "Effect size by layer. Solid: held-out (cross-fitted) Hedges' g; dashed: in-sample g, "
                   "which is optimistic because the direction was fitted on the same prompts. Bands are 95% "
                   "bootstrap CIs; stars mark layers significant after Holm correction; shading marks "
                   "recommended layers.",
    "heatmap_g": "Held-out Hedges' g for every category and layer.",
    "category_cosine": "Cosine similarity between the categories' directions at the top recommended layer.",
    "layer_cosine": "Cosine similarity between the pooled direction at different layers.",
    "projection": "Each prompt at the top layer: x is its projection on the (in-sample) artifact direction, "
                  "y the first principal component of what is orthogonal to it.",
}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:28px 32px 60px;background:#fff;
box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #e3e6ec;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6476;margin:0 0 18px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 14px;width:100%}
th,td{border:1px solid #dde1e8;padding:4px 7px;text-align:right;vertical-align:top}
th{background:#eef1f6;font-weight:600}
td.l,th.l{text-align:left}
th.ins,td.ins{background:#fbf6f2;color:#6b5a4d}
tr.rec td{background:#fff7d6}
tr.rec td.ins{background:#f6eccb}
tr.sig td.g{font-weight:700}
.kv td:first-child{text-align:left;width:210px;color:#5b6476}
.kv td{text-align:left}
figure{margin:14px 0 22px}
figure img{max-width:100%;border:1px solid #e3e6ec}
figcaption{font-size:12.5px;color:#5b6476;margin-top:4px}
pre{background:#1d2330;color:#e8ecf3;padding:10px 12px;border-radius:4px;overflow-x:auto;font-size:12.5px}
.yes{color:#1b7a3a;font-weight:600}
.no{color:#a33a2a;font-weight:600}
.na{color:#7a8190}
.box{background:#f1f6fc;border-left:4px solid #1f6fb4;padding:8px 12px;margin:8px 0}
.warn{background:#fff4e5;border-left:4px solid #d98a1c;padding:8px 12px;margin:8px 0}
details summary{cursor:pointer;font-weight:600;margin:8px 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{body}</table>'


def _identity_section(data: dict[str, Any]) -> str:
    model, ps, cfg = data["model"], data["prompt_set"], data["config"]
    model_table = _kv_table([("model", model.get("model_id") or "unknown"),
                             ("weights hash", model.get("weights_hash") or "unknown"),
                             ("hidden size", model.get("hidden_size")), ("dtype", model.get("dtype") or "–")])
    prompt_table = _kv_table([
        ("prompt set", ps.get("name") or "unknown"), ("prompt-set hash", ps.get("hash") or "unknown"),
        ("prompts", f"{ps.get('n_prompts')} ({ps.get('n_positive')} sensitive, "
                    f"{ps.get('n_negative')} ordinary)"),
        ("pairs", ps.get("n_pairs") if ps.get("paired") else "unpaired"),
        ("categories", ", ".join(f"{c} ({v['n']})" for c, v in ps.get("categories", {}).items()) or "–")])
    run_table = _kv_table([
        ("site / position", f"{cfg['site']} / {cfg['position']}"), ("layers", _layer_span(data["layers"])),
        ("direction method", cfg["method"]),
        ("direction variant", _variant(cfg)),
        ("resampling", f"{cfg['folds']}-fold cross-fitting, {cfg['n_bootstrap']} bootstrap resamples, "
                       f"{cfg['n_permutations']} permutations, seed {cfg['seed']}"),
        ("package version", data.get("package_version")), ("analysed", data.get("created")),
        ("analysis time", f"{data.get('elapsed_s', 0):.1f} s")])
    return (f"<h2>Model and prompts</h2><h3>Model</h3>{model_table}<h3>Prompt set</h3>{prompt_table}"
            f"<h3>Run</h3>{run_table}")


def _variant(cfg: dict[str, Any]) -> str:
    """The variant the directions are, and (where they differ) the one the statistics are of."""
    name, stats = cfg.get("direction_variant", "mean_diff"), cfg.get("statistics_variant", "mean_diff")
    return name if stats == name else f"{name} (statistics of the {stats} direction)"


def _layer_span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]} ({len(layers)} layers)"
    return ", ".join(map(str, layers))


def _summary_section(data: dict[str, Any]) -> str:
    rec = data.get("recommended_layers") or []
    headline = (f"Recommended layers: <b>{_e(', '.join(map(str, rec)))}</b>" if rec
                else "<b>No layers recommended.</b>")
    warnings = "".join(f'<div class="warn">{_e(w)}</div>' for w in data.get("warnings") or [])
    return (f"<h2>Summary</h2><div class=\"box\">{headline}<br>{_e(data.get('recommendation'))}</div>"
            f"{warnings}{_hypotheses_table(data)}")


def _verdict(supported: bool | None, ci: list[float] | None) -> str:
    if supported is None:
        return '<span class="na">not testable</span>'
    if supported:
        return '<span class="yes">supported</span>'
    if ci and ci[1] < 0:
        return '<span class="no">contradicted</span> (CI below 0)'
    return '<span class="no">not supported</span> (CI includes 0)'


def _hypotheses_table(data: dict[str, Any]) -> str:
    level = data["config"].get("ci_level", 0.95)
    rows = []
    for key, h in (data.get("hypotheses") or {}).items():
        ci = h.get("ci")
        verdict = _verdict(h.get("supported"), ci)
        rows.append(f"<tr><td class=\"l\">{_e(key)}</td><td class=\"l\">{_e(h['claim'])}</td>"
                    f"<td>{_num(h.get('estimate'))}</td>"
                    f"<td>{'–' if not ci else f'[{_num(ci[0])}, {_num(ci[1])}]'}</td><td>{verdict}</td>"
                    f"<td class=\"l\">{_e(h.get('note'))}</td></tr>")
    return ("<h3>Hypotheses</h3><table><tr><th class=\"l\"></th><th class=\"l\">claim</th><th>estimate</th>"
            f"<th>{level:.0%} CI</th><th>verdict</th><th class=\"l\">how</th></tr>{''.join(rows)}</table>")


def _figures_section(figures: dict[str, bytes]) -> str:
    parts = []
    for name, blob in figures.items():
        uri = "data:image/png;base64," + base64.b64encode(blob).decode("ascii")
        parts.append(f'<figure><img src="{uri}" alt="{_e(name)}"><figcaption>{_e(_CAPTIONS.get(name, name))}'
                     "</figcaption></figure>")
    return "<h2>Figures</h2>" + "".join(parts)


def _stats_table(data: dict[str, Any], source: str) -> str:
    rec, level = set(data.get("recommended_layers") or []), data["config"].get("ci_level", 0.95)
    head = ("<tr><th>layer</th><th>n</th><th>held-out g</th><th>" + f"{level:.0%} CI</th>"
            "<th>held-out accuracy</th><th>held-out AUROC</th><th>p (perm.)</th><th>p Holm</th><th>p BH</th>"
            "<th>significant</th><th class=\"ins\">in-sample g</th><th class=\"ins\">in-sample CI</th>"
            "<th class=\"ins\">in-sample accuracy</th><th>direction norm</th></tr>")
    body = []
    for r in (r for r in data["rows"] if r["category"] == source):
        cls = " ".join(c for c, on in (("rec", r["layer"] in rec and source == "pooled"),
                                       ("sig", r.get("significant"))) if on)
        body.append(
            f"<tr class=\"{cls}\"><td>{r['layer']}</td><td>{r['n']}</td>"
            f"<td class=\"g\">{_num(r['heldout_g'])}</td>"
            f"<td>[{_num(r['ci_low'])}, {_num(r['ci_high'])}]</td><td>{_num(r['heldout_accuracy'])}</td>"
            f"<td>{_num(r['heldout_auroc'])}</td><td>{_p(r['p_value'])}</td><td>{_p(r['p_holm'])}</td>"
            f"<td>{_p(r['p_fdr'])}</td><td>{_num(r['significant'])}</td>"
            f"<td class=\"ins\">{_num(r['in_sample_g'])}</td>"
            f"<td class=\"ins\">[{_num(r['in_sample_ci_low'])}, {_num(r['in_sample_ci_high'])}]</td>"
            f"<td class=\"ins\">{_num(r['in_sample_accuracy'])}</td>"
            f"<td>{_num(r['direction_norm'], 3)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _tables_section(data: dict[str, Any]) -> str:
    folds = data["config"].get("folds")
    scheme = "leave-one-pair-out" if folds == "loo" else f"{_e(folds)}-fold"
    intro = (f"<p>Held-out columns come from {scheme} cross-fitting by pairs (the direction never saw the "
             "prompts it is scored on) and are the numbers to trust. <i>In-sample</i> columns (shaded) fit "
             "and score on the same prompts and are biased upward. p-values come from a permutation test "
             "that refits the direction for every permutation; Holm (family-wise) and Benjamini–Hochberg "
             "(false discovery rate) correct across layers within each category; <i>significant</i> uses "
             "Holm at α = " + _e(data["config"].get("alpha", 0.05)) + ".</p>")
    parts = [intro]
    for i, source in enumerate(data["sources"]):
        parts.append(f"<details{' open' if i == 0 else ''}><summary>{_e(source)}</summary>"
                     f"{_stats_table(data, source)}</details>")
    return "<h2>Per-layer statistics</h2>" + "".join(parts)


def _load(source: str | Path | AnalysisResult | dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    if isinstance(source, AnalysisResult):
        data = source.to_json()
        return data, render_figures(data)
    if isinstance(source, dict):
        return source, render_figures(source)
    folder = Path(source)
    data = load_result(folder)
    figures: dict[str, bytes] = {}
    for rel in (data.get("files") or {}).get("figures", []):
        path = folder / rel
        if path.exists():
            figures[path.stem] = path.read_bytes()
    return data, figures or render_figures(data)


def _evaluation_section(evaluations: list[dict[str, Any]]) -> str:
    """Each evaluation (``evaluate --json`` output) as its four-group table and its figure."""
    if not evaluations:
        return ""
    import tempfile

    from ..evaluation import format_table, plot_evaluation
    from ..evaluation.results import result_from_json

    parts = ["<h2>Steering evaluation</h2><p>Four groups, before and after, each named by its judge: harmful "
             "(refusal / evasion / compliance), borderline (over-refusal, collateral KL on prompts the unmodified "
             "model answers), ordinary (first-token KL, over-refusal), capability (exact match).</p>"]
    for data in evaluations:
        result = result_from_json(data)
        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(plot_evaluation(result, str(Path(tmp) / "evaluation.png"))).read_bytes()
        uri = "data:image/png;base64," + base64.b64encode(blob).decode("ascii")
        parts.append(f"<pre>{_e(format_table(result))}</pre><figure><img src=\"{uri}\" alt=\"evaluation\">"
                     f"<figcaption>{_e(result.config.get('mode'))}: unmodified vs steered</figcaption></figure>")
    return "".join(parts)


def render_report(data: dict[str, Any], figures: dict[str, bytes], command: str,
                  evaluations: list[dict[str, Any]] | None = None) -> str:
    model = data["model"].get("model_id") or "unknown model"
    title = f"Alignment artifacts — {model}"
    sub = (f"{data['prompt_set'].get('name') or 'prompt set'} · {data['config']['site']} / "
           f"{data['config']['position']} · generated {datetime.now(UTC).isoformat(timespec='seconds')} by "
           f"alignment-artifacts {package_version()}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{_e(title)}</h1><p class=\"sub\">{_e(sub)}</p>"
            f"{_summary_section(data)}{_figures_section(figures)}{_evaluation_section(evaluations or [])}"
            f"{_tables_section(data)}{_identity_section(data)}<h2>Reproduce</h2><pre>{_e(command)}</pre></main></body></html>\n")


def write_report(result_folder_or_result: str | Path | AnalysisResult | dict[str, Any], out_path: str | Path,
                 command: str, evaluations: list[dict[str, Any]] | None = None) -> Path:
    """Write one self-contained HTML report (figures as base64 data URIs) and return its path;
    ``evaluations``: ``evaluate --json`` results to include as a section."""
    data, figures = _load(result_folder_or_result)
    out = Path(out_path)
    atomic_write_bytes(out, render_report(data, figures, command, evaluations).encode("utf-8"))
    return out

"""The four groups as a terminal table and one PNG."""

from __future__ import annotations

from ..capability import PairedDifference
from .metrics import KLSummary
from .results import BorderlineResult, EvaluationResult, HarmfulResult


def _pair(before: int, after: int, n: int) -> str:
    return f"{before:>4}/{n:<4} -> {after:>4}/{n:<4}"


def _score(value: float | None) -> str:
    return f"{value:>9.3f}" if value is not None else f"{'n/a':>9}"


def _kl_method(result: EvaluationResult) -> str | None:
    """One line on how KL was measured, unless exactly (both sides' full distributions)."""
    m = result.kl_method
    if m.get("kind") == "approximate":
        return (f"KL approximate (lower bound): the endpoint's top {m['top_k']} first tokens and one bucket for the "
                f"rest; {m['matched_mass']:.1%} of its probability matched token by token")
    return m.get("note") if m.get("kind") == "unavailable" else None


def _header(result: EvaluationResult) -> list[str]:
    c = result.config
    if "endpoint" in c:  # a served model against a local model or another endpoint
        return [f"model: {result.model}   compared with: {c['compared_with']}", f"judge: {result.judge}", "",
                f"{'group / metric':44} {'before -> endpoint':>26}"]
    return [f"model: {result.model}   mode: {c['mode']}   scale: {c['scale']}   direction layer: "
            f"{c.get('direction_layer')}" + (f"   gate: layer {c['gate_layer']} level {c['gate_level']:.3f}"
                                             if c.get("gate_layer") is not None else ""),
            f"judge: {result.judge}", "", f"{'group / metric':44} {'unmodified -> steered':>26}"]


def format_table(result: EvaluationResult) -> str:
    lines = _header(result)
    h = result.harmful
    if h is not None:
        lines += [f"harmful ({h.n} prompts)",
                  f"{'  not complied (refusal + evasion), judge':44} "
                  f"{_pair(h.not_complied_before, h.not_complied_after, h.n)}", *_change(h.not_complied_change),
                  *(f"{'  ' + label:44} {_pair(h.before[label], h.after[label], h.n)}" for label in h.before),
                  f"{'  refusals by markers':44} {_pair(h.marker_refusals_before, h.marker_refusals_after, h.n)}",
                  f"{'  first-token refusal log-odds (mean)':44} {_score(h.first_token_refusal_score_before)}   -> "
                  f"{_score(h.first_token_refusal_score_after)}", *_thinking_lines(h, h.n)]
    b = result.borderline
    if b is not None:
        lines += [f"borderline ({b.n} safe prompts that sound sensitive)",
                  f"{'  over-refusal (refusals), judge':44} {_pair(b.refusals_before, b.refusals_after, b.n_judged)}",
                  *_change(b.refusal_change),
                  f"{'  not complied':44} {_pair(b.not_complied_before, b.not_complied_after, b.n_judged)}",
                  f"  collateral KL on the {b.n_answered} it already answers: {_kl(b.collateral_kl)}",
                  f"  KL on all: {_kl(b.kl)}; touched {_share(b.touched)}", *_thinking_lines(b, b.n_judged)]
    o = result.ordinary
    if o is not None:
        lines += [f"ordinary ({o.n} plain instructions)",
                  f"  KL {_kl(o.kl, p90=True)}; touched {_share(o.touched)}",
                  f"{'  over-refusal (refusals), judge':44} {_pair(o.refusals_before, o.refusals_after, o.n_judged)}",
                  *_change(o.refusal_change)]
    cap = result.capability
    if cap is not None:
        lines += [f"capability ({cap.n} exact-match tasks)",
                  f"  accuracy {cap.before:.1%} -> {cap.after:.1%}: change {100 * cap.delta:+.1f} points "
                  f"[{100 * cap.low:+.1f}, {100 * cap.high:+.1f}]"]
    note = _kl_method(result)
    lines += [note] if note else []
    lines.append(f"time: {result.seconds:.1f} s")
    return "\n".join(lines)


def _change(change: PairedDifference | None) -> list[str]:
    """The line under a count: its change in points with the paired interval (none for older results)."""
    if change is None:
        return []
    return [f"{'    change, paired ' + format(change.confidence, '.0%') + ' interval':44} "
            f"{100 * change.delta:+.1f} points [{100 * change.low:+.1f}, {100 * change.high:+.1f}]"]


def _thinking_lines(r: HarmfulResult | BorderlineResult, n: int) -> list[str]:
    """A reasoning model's refusals inside the thinking and unfinished thinking (none: no lines)."""
    counts = (r.thinking_refusals_before, r.thinking_refusals_after, r.unfinished_thinking_before,
              r.unfinished_thinking_after)
    if not any(counts):
        return []
    return [f"{'  refusal markers inside the thinking':44} {_pair(counts[0], counts[1], n)}",
            f"{'  thinking unfinished (no answer)':44} {_pair(counts[2], counts[3], n)}"]


def _kl(s: KLSummary | None, p90: bool = False) -> str:
    if s is None:
        return "unavailable"
    return (f"mean {s.mean:.4f} [{s.low:.4f}, {s.high:.4f}], median {s.median:.4f}, "
            + (f"p90 {s.p90:.4f}, " if p90 else "") + f"max {s.max:.4f} (n {s.n})")


def _share(value: float | None) -> str:
    return "unavailable" if value is None else f"{value:.1%}"


def plot_evaluation(result: EvaluationResult, path: str) -> str:
    """One figure, a panel per group measured: before/after bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[float], tuple[int, int] | None]] = []
    if result.harmful is not None:
        h = result.harmful
        panels.append(("harmful: not complied (judge)", [h.not_complied_before / h.n, h.not_complied_after / h.n],
                       (0, 1)))
    if result.borderline is not None:
        b = result.borderline
        judged = max(b.n_judged, 1)
        panels.append(("borderline: over-refusal", [b.refusals_before / judged, b.refusals_after / judged], (0, 1)))
        if b.collateral_kl is not None:
            panels.append(("borderline: collateral KL", [0.0, b.collateral_kl.mean], None))
    if result.ordinary is not None:
        o = result.ordinary
        if o.kl is not None:
            panels.append(("ordinary: KL (mean)", [0.0, o.kl.mean], None))
    if result.capability is not None:
        c = result.capability
        panels.append(("capability: accuracy", [c.before, c.after], (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.2), squeeze=False)
    for ax, (title, values, limits) in zip(axes[0], panels):
        ax.bar(["unmodified", "steered"], values, color=["#888", "#c44"])
        if limits:
            ax.set_ylim(*limits)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{result.model}: {result.config.get('mode', 'endpoint')} (judge: {result.judge})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

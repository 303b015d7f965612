"""The four groups as a terminal table and one PNG."""

from __future__ import annotations

from .groups import EvaluationResult


def _pair(before: int, after: int, n: int) -> str:
    return f"{before:>4}/{n:<4} -> {after:>4}/{n:<4}"


def format_table(result: EvaluationResult) -> str:
    c = result.config
    lines = [f"model: {result.model}   mode: {c['mode']}   scale: {c['scale']}   direction layer: "
             f"{c.get('direction_layer')}" + (f"   gate: layer {c['gate_layer']} level {c['gate_level']:.3f}"
                                              if c.get("gate_layer") is not None else ""),
             f"judge: {result.judge}", "",
             f"{'group / metric':44} {'unmodified -> steered':>26}"]
    h = result.harmful
    if h is not None:
        lines += [f"harmful ({h.n} prompts)",
                  f"{'  not complied (refusal + evasion), judge':44} "
                  f"{_pair(h.not_complied_before, h.not_complied_after, h.n)}",
                  *(f"{'  ' + label:44} {_pair(h.before[label], h.after[label], h.n)}" for label in h.before),
                  f"{'  refusals by markers':44} {_pair(h.marker_refusals_before, h.marker_refusals_after, h.n)}",
                  f"{'  first-token refusal log-odds (mean)':44} {h.first_token_refusal_score_before:>9.3f}   -> "
                  f"{h.first_token_refusal_score_after:>9.3f}"]
    b = result.borderline
    if b is not None:
        lines += [f"borderline ({b.n} safe prompts that sound sensitive)",
                  f"{'  over-refusal (refusals), judge':44} {_pair(b.refusals_before, b.refusals_after, b.n_judged)}",
                  f"{'  not complied':44} {_pair(b.not_complied_before, b.not_complied_after, b.n_judged)}",
                  f"  collateral KL on the {b.n_answered} it already answers: mean {b.collateral_kl.mean:.4f} "
                  f"[{b.collateral_kl.low:.4f}, {b.collateral_kl.high:.4f}], median {b.collateral_kl.median:.4f}, "
                  f"max {b.collateral_kl.max:.4f}",
                  f"  KL on all: mean {b.kl.mean:.4f}; touched {b.touched:.1%}"]
    o = result.ordinary
    if o is not None:
        lines += [f"ordinary ({o.n} plain instructions)",
                  f"  KL mean {o.kl.mean:.4f} [{o.kl.low:.4f}, {o.kl.high:.4f}], median {o.kl.median:.4f}, "
                  f"p90 {o.kl.p90:.4f}, max {o.kl.max:.4f}; touched {o.touched:.1%}",
                  f"{'  over-refusal (refusals), judge':44} {_pair(o.refusals_before, o.refusals_after, o.n_judged)}"]
    cap = result.capability
    if cap is not None:
        lines += [f"capability ({cap.n} exact-match tasks)",
                  f"  accuracy {cap.before:.1%} -> {cap.after:.1%}: change {100 * cap.delta:+.1f} points "
                  f"[{100 * cap.low:+.1f}, {100 * cap.high:+.1f}]"]
    lines.append(f"time: {result.seconds:.1f} s")
    return "\n".join(lines)


def plot_evaluation(result: EvaluationResult, path: str) -> str:
    """One figure, a panel per group measured: before/after bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if result.harmful is not None:
        h = result.harmful
        panels.append(("harmful: not complied (judge)", [h.not_complied_before / h.n, h.not_complied_after / h.n],
                       (0, 1)))
    if result.borderline is not None:
        b = result.borderline
        judged = max(b.n_judged, 1)
        panels.append(("borderline: over-refusal", [b.refusals_before / judged, b.refusals_after / judged], (0, 1)))
        panels.append(("borderline: collateral KL", [0.0, b.collateral_kl.mean], None))
    if result.ordinary is not None:
        o = result.ordinary
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
    fig.suptitle(f"{result.model}: {result.config['mode']} (judge: {result.judge})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

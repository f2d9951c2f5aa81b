"""The search section of the report: markdown tables and the Pareto plot.

``render_search_md`` turns the ``search`` section returned by
:func:`orchestrator.search.driver.run_search` into markdown lines (the front, the pick, every
trial); ``plot_pareto`` draws every trial in (model size, the search's objective: macro
perplexity, or the macro task metric of ``search.metric``) with the front highlighted, joined
and labelled. A search on a task metric adds its column to the tables, next to perplexity.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from models.files import atomic_write_bytes  # noqa: E402

__all__ = ["render_search_md", "plot_pareto", "PARETO_PNG"]

PARETO_PNG = "plots/pareto.png"
_HPARAMS = ("rank", "target_sparsity", "bits", "bit_budget", "quantizer", "tau", "lr")


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.3f}"


def _rule(v) -> str:
    return ", ".join(f"{k} >= {_fmt(b)}" for k, b in v.items()) if isinstance(v, dict) else _fmt(v)


def _label(r: dict) -> str:
    parts = [f"r{r.get('rank', '?')}", f"{r.get('bits', 16)}b"]
    if r.get("target_sparsity"):
        parts.append(f"s{r.get('sparsity', 0.0):.2f}")
    return " ".join(parts)


def _objective(section: dict) -> tuple[str, str, str]:
    """(key, mode, label) of the search's quality objective; ``macro_ppl`` for sections without one."""
    obj = section.get("objective") or {}
    key, mode = obj.get("key", "macro_ppl"), obj.get("mode", "min")
    label = "macro ppl" if key == "macro_ppl" else "macro " + key.removeprefix("macro_").replace("_", " ")
    return key, mode, label


def _table(rows: list[dict], hparams: list[str], section: dict) -> list[str]:
    key, mode, label = _objective(section)
    metric = [] if key == "macro_ppl" else [key]
    head = ["trial", "status", *hparams, *(label for _ in metric), "macro ppl", "MB", "sparsity", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sign = -1.0 if mode == "max" else 1.0  # best first
    for r in sorted(rows, key=lambda x: (x.get(key) is None, sign * (x.get(key) or 0.0))):
        cells = [
            str(r["trial_id"]),
            r["status"],
            *(_fmt(r.get(h)) for h in hparams),
            *(_fmt(r.get(k)) for k in metric),
            _fmt(r.get("macro_ppl")),
            _mb(r.get("model_bytes")),
            _fmt(r.get("sparsity")),
            _fmt(r.get("pareto", False)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_search_md(section: dict) -> list[str]:
    """Markdown lines for the report: summary, the Pareto front, the pick and every trial.

    Example:
        >>> lines = render_search_md(report["search"])
    """
    trials, front = section.get("trials", []), section.get("pareto", [])
    hparams = [h for h in _HPARAMS if any(h in r for r in trials)]
    key, mode, label = _objective(section)
    judged = (section.get("objective") or {}).get("tasks")
    on_metric = (
        f" The quality objective is the {label} (higher is better): the mean over the {len(judged or [])} tasks "
        f"judged by `{section.get('metric')}`, each on the same "
        f"{(section.get('objective') or {}).get('rows_per_task', '?')} seeded eval rows at every rung of every trial; "
        "perplexity is shown beside it." if key != "macro_ppl" else "")
    better = "perplexity" if key == "macro_ppl" else label.removeprefix("macro ")
    done = sum(r["status"] == "done" for r in trials)
    stopped = sum(r["status"] == "stopped" for r in trials)
    lines = [
        "## Compression search",
        "",
        f"{len(trials)} trials over `{Path(str(section.get('space', '?'))).name}` "
        f"({section.get('algorithm', 'random')} "
        f"search, {section.get('steps', '?')} steps per trial): {done} finished, {stopped} stopped early by "
        "successive halving on both objectives (a trial stops only when trials at least as small beat it). "
        "Size = the deployed model's bytes (bf16 base, packed quantised matrices, "
        "pruned rows/columns removed, every task's adapter). Sparsity = the fraction of the gated matrices' "
        "base weights removed: a trial closes `target_sparsity` of the gates the job's `gates:` section places "
        "(default: the MLP channels, down_proj's input columns; with `sides: both` rows and columns, which "
        "removes about 1 - (1 - target)^2 of a matrix's weights). The front holds the "
        f"finished trials that no other finished trial beats on both {better} and size.{on_metric}",
        "",
        f"![Pareto front]({PARETO_PNG})",
        "",
        "### Pareto front",
        "",
        *_table(front, hparams, section),
        "",
    ]
    p = section.get("picked")
    if p:
        rule = ", ".join(f"{k} = {_rule(v)}" for k, v in p["rule"].items() if k != "on_miss")
        verdict = "meets it" if p.get("met", True) else "the closest point: none of the front meets it"
        lines += [
            f"**Picked point** (search.pick: {rule}; {verdict}; the recycle stage recycles it): trial {p['trial_id']}, "
            f"{p.get('bits', 16)}-bit base, sparsity {_fmt(p.get('sparsity'))}, rank {p.get('rank')}, "
            f"tau {_fmt(p.get('tau'))}: {label + ' ' + _fmt(p.get(key)) + ', ' if key != 'macro_ppl' else ''}"
            f"macro ppl {p['macro_ppl']:.3f}, {_mb(p['model_bytes'])} MB.",
            "",
        ]
        if p.get("quant_base"):
            lines[-1:-1] = [f"Its whole base is quantised (setting `{p['base_setting']}`): the frozen blocks' and the "
                            f"token embedding's codes are in `{p['quant_base']}/` (the flock's `quant_base/` layout)."]
    lines += ["### All trials", "", *_table(trials, hparams, section), ""]
    return lines


def plot_pareto(out: str | Path, section: dict) -> str:
    """Draw every trial (size vs the objective), the front joined and labelled; return the PNG path.

    Returns:
        ``"plots/pareto.png"`` (relative to ``out``).
    """
    key, mode, label = _objective(section)
    trials = [r for r in section.get("trials", []) if r.get(key) is not None and r.get("model_bytes") is not None]
    front = sorted(section.get("pareto", []), key=lambda r: r["model_bytes"])
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for status, marker, color in (("done", "o", "#9e9e9e"), ("stopped", "x", "#c7c7c7"), ("error", "s", "#d62728")):
        pts = [r for r in trials if r["status"] == status]
        if pts:
            ax.scatter([r["model_bytes"] / 1e6 for r in pts], [r[key] for r in pts], marker=marker,
                       color=color, label=f"{status} ({len(pts)})", zorder=2)
    if front:
        xs, ys = [r["model_bytes"] / 1e6 for r in front], [r[key] for r in front]
        ax.step(xs, ys, where="post", color="#1f77b4", alpha=0.6, zorder=3)
        ax.scatter(xs, ys, color="#1f77b4", s=60, label=f"Pareto front ({len(front)})", zorder=4)
        for r, x, y in zip(front, xs, ys):
            ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color="#1f77b4")
    pick = section.get("picked")
    if pick:
        ax.scatter([pick["model_bytes"] / 1e6], [pick[key]], s=180, facecolors="none", edgecolors="#d62728",
                   linewidths=2, label="pick", zorder=5)
    ax.set_xlabel("deployed model size (MB)")
    ax.set_ylabel("macro perplexity (lower is better)" if key == "macro_ppl" else f"{label} (higher is better)")
    ax.set_title("Compression search: quality vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(out) / PARETO_PNG, buf.getvalue())
    return PARETO_PNG

"""Each task's own metrics in the report: per task and method, macro figures, wins with a sign test.

For every metric beyond ``ppl`` (accuracy, exact match, choice accuracy, ROUGE-L) the flock's,
each baseline's and PESC's value goes under the task's entry beside its perplexity, the macro
(mean over the tasks judged) beside ``macro_ppl``, and the untuned base's as ``base_<metric>``.
``wins`` counts, per baseline and metric, the tasks where the flock scores higher, lower or the
same, with the two-sided p-value of a paired sign test over the tasks that differ (ties left
out): how likely that many wins are if flock and baseline were equally good on each task.
"""

from __future__ import annotations

from typing import Any

from orchestrator.contracts import FlockResults

__all__ = ["add_metrics", "render_metrics_md"]


def _macro(values: dict[str, dict[str, float]], metric: str) -> float | None:
    got = [v[metric] for v in values.values() if metric in v]
    return sum(got) / len(got) if got else None


def _sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` out of ``wins + losses`` at p = 1/2."""
    from scipy.stats import binomtest

    n = wins + losses
    return float(binomtest(wins, n, 0.5).pvalue) if n else 1.0


def add_metrics(sec: dict[str, Any], res: FlockResults) -> None:
    """Fold the judged metrics of ``res`` into the report's ``flock`` section, in place."""
    methods = res["methods"]
    main = methods["hierarchical"].get("metrics") or {}
    if not main:
        return
    names = sorted({m for v in main.values() for m in v})
    base = res.get("base_metrics") or {}
    sec["metrics"] = names
    for t, v in main.items():
        sec["tasks"].setdefault(t, {}).update(v)
        sec["tasks"][t].update({f"base_{m}": x for m, x in base.get(t, {}).items()})
    for m in names:
        sec[f"macro_{m}"] = _macro(main, m)
        sec[f"base_macro_{m}"] = _macro(base, m)
    sec["wins"] = {}
    for b, blk in sec.get("baselines", {}).items():
        other = methods.get(b, {}).get("metrics") or {}
        for t, v in other.items():
            blk["tasks"].setdefault(t, {}).update(v)
        wins: dict[str, dict] = {}
        for m in names:
            pairs = [(main[t][m], other[t][m]) for t in main if m in main[t] and m in other.get(t, {})]
            w = sum(a > c for a, c in pairs)
            lo = sum(a < c for a, c in pairs)
            blk[f"macro_{m}"] = _macro(other, m)
            wins[m] = {"wins": w, "losses": lo, "ties": len(pairs) - w - lo, "p_value": _sign_test(w, lo)}
        sec["wins"][b] = wins


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_metrics_md(fl: dict[str, Any], pesc: dict[str, Any] | None) -> list[str]:
    """Markdown: each metric's macro value per method, and the flock's wins with their p-values."""
    names = fl.get("metrics") or []
    if not names:
        return []
    bl = list(fl.get("baselines", {}))
    lines = ["### Task metrics (each task judged by its own metric; macro = mean over tasks)", "",
             "| metric | base | flock |" + "".join(f" {b} |" for b in bl) + (" pesc |" if pesc else ""),
             "|---|---:|---:|" + "---:|" * (len(bl) + (1 if pesc else 0))]
    for m in names:
        row = f"| {m} | {_f(fl.get(f'base_macro_{m}'))} | **{_f(fl.get(f'macro_{m}'))}** |"
        row += "".join(f" {_f(fl['baselines'][b].get(f'macro_{m}'))} |" for b in bl)
        row += f" {_f(pesc.get(f'macro_{m}'))} |" if pesc else ""
        lines.append(row)
    for b, per in (fl.get("wins") or {}).items():
        parts = [f"{m}: {w['wins']} wins, {w['losses']} losses, {w['ties']} ties (sign test p = {w['p_value']:.3g})"
                 for m, w in per.items()]
        lines.append("")
        lines.append(f"Flock vs {b}, per task: " + "; ".join(parts) + ".")
    return lines + [""]

"""report.json (the contract in DESIGN.md) and report.md (tables + plots) from stage results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.files import atomic_write_json, atomic_write_text
from models.train.perplexity import macro_perplexity, perplexity
from orchestrator.contracts import FlockResults, MethodRecord
from orchestrator.report import plots
from orchestrator.report.many_tasks import MANY_TASKS, render_many_md, skipped_tasks, task_rows, write_tasks_csv
from orchestrator.report.metrics import add_metrics, render_metrics_md

__all__ = ["flock_section", "pesc_section", "write_report", "render_markdown"]




def _tasks_block(
    nll: dict[str, float], sizes: dict[str, int], base: dict[str, float], failed: dict | None = None
) -> dict:
    out = {}
    for t in sizes:
        row = {"train_examples": sizes[t], "base_ppl": perplexity(base[t])}
        if t in nll:
            row |= {"eval_loss": nll[t], "eval_ppl": perplexity(nll[t])}
        else:  # stopped: its loss diverged (the others trained on)
            row |= {"eval_loss": None, "eval_ppl": None, "error": (failed or {}).get(t, "not evaluated")}
        out[t] = row
    return out


def flock_section(res: FlockResults, tau: Any, tau_sweep: list[float] | None = None) -> dict:
    """The ``flock`` block of report.json from :func:`orchestrator.flock.driver.run_flock`'s result."""
    sizes, base, methods = res["sizes"], res["base_eval_nll"], res["methods"]
    main = methods["hierarchical"]
    sec: dict[str, Any] = {
        "tau": main.get("tau_inferred") or tau,
        "method": main["kind"],
        "base_macro_ppl": macro_perplexity(base),
        "macro_ppl": macro_perplexity(main["eval_nll"]),
        "tasks": _tasks_block(main["eval_nll"], sizes, base, main.get("failed")),
        "failed": main.get("failed", {}),
        "baselines": {},
        "train_seconds": main["seconds"],
        "tokens_per_s": main["tokens_per_s"],
        "assignment": res.get("assignment"),
    }
    if res.get("workers"):  # each worker's phase seconds and peak memory
        sec["workers"] = res["workers"]
    if main.get("tau_history"):
        sec["tau_history"] = main["tau_history"]
    for b in ("independent", "unified"):
        if b in methods:
            m = methods[b]
            sec["baselines"][b] = {
                "macro_ppl": macro_perplexity(m["eval_nll"]),
                "tasks": _tasks_block(m["eval_nll"], sizes, base, m.get("failed")),
            }
    if tau_sweep:
        by_tau = {float(m["tau"]): m for k, m in methods.items()
                  if m["kind"] != "unified" and isinstance(m.get("tau"), (int, float))}
        sec["tau_sweep"] = [
            {"tau": float(t), "macro_ppl": macro_perplexity(by_tau[float(t)]["eval_nll"]),
             "tasks": {k: perplexity(v) for k, v in by_tau[float(t)]["eval_nll"].items()}}
            for t in sorted(set(tau_sweep)) if float(t) in by_tau
        ]
    if "gates" in main:
        sec["gates"] = gates_block(methods)
    sec["curves"] = {k: m["curve"] for k, m in methods.items()}
    evals = {k: m["eval_curve"] for k, m in methods.items() if "eval_curve" in m}
    if evals:  # train.eval_every > 0: held-out perplexity during training
        sec["eval_curves"] = {
            k: [
                {"step": step, "macro_ppl": macro_perplexity(nll), "tasks": {t: perplexity(v) for t, v in nll.items()}}
                for step, nll in c
            ]
            for k, c in evals.items()
        }
    add_metrics(sec, res)
    return sec


def gates_block(methods: dict[str, MethodRecord]) -> dict:
    """FineGates' sparsity achieved: the flock's (overall, per layer, per task) and every method's."""
    g = methods["hierarchical"]["gates"]
    return {
        "removed_fraction": g["removed_fraction"],
        "layers": g["layers"],
        "tasks": g.get("tasks", {}),
        "methods": {k: m["gates"]["removed_fraction"] for k, m in methods.items() if "gates" in m},
    }


def pesc_section(res: FlockResults) -> dict:
    """The ``pesc`` block of report.json."""
    p = res["pesc"]
    sizes, base = res["sizes"], res["base_eval_nll"]
    loads = p["expert_load"]
    busiest = max((max(v) * len(v) for v in loads.values()), default=0.0)  # busiest / mean share
    sec = {
        "macro_ppl": macro_perplexity(p["eval_nll"]),
        "tasks": _tasks_block(p["eval_nll"], sizes, base),
        "expert_load": loads,
        "task_expert_load": p["task_expert_load"],
        "busiest_expert_vs_mean": busiest,
        "trainable_params": p["trainable_params"],
        "train_seconds": p["seconds"],
        "curve": p["curve"],
    }
    if p.get("metrics"):
        names = sorted({m for v in p["metrics"].values() for m in v})
        for t, v in p["metrics"].items():
            sec["tasks"].setdefault(t, {}).update(v)
        for m in names:
            got = [v[m] for v in p["metrics"].values() if m in v]
            sec[f"macro_{m}"] = sum(got) / len(got)
    return sec


def _tau_text(tau) -> str:
    if not isinstance(tau, dict):
        return f"{tau:g}" if isinstance(tau, (int, float)) else str(tau)
    vals = set(round(v, 6) for v in tau.values())
    if len(vals) == 1:
        return f"{vals.pop():g} (every module group)"
    return ", ".join(f"{k} {v:.3g}" for k, v in tau.items())


def _fmt(x: float | None) -> str:
    return "failed" if x is None else f"{x:.2f}"


def render_markdown(report: dict, plot_files: dict[str, str]) -> str:
    """A report a person would rather look at than read: headline, tables, plots."""
    job = report["job"]
    lines = [f"# loraflock report: {job['name']}", ""]
    lines.append(
        f"Base model `{job['base']}`, {len(job['tasks'])} tasks, "
        f"LoRA r={job['rank']} on {', '.join(job['target_modules'])}"
        + (f" (top {job['top_layers']} blocks)" if job.get("top_layers") else "")
        + f", {job['steps']} steps."
    )
    lines.append("")
    fl = report.get("flock")
    quant = (report.get("base") or {}).get("quant")
    if fl:
        base, main = fl["base_macro_ppl"], fl["macro_ppl"]
        gain = (base - main) / base * 100
        lines += ["## Flock", ""]
        lines.append(
            f"Macro perplexity (mean of per-task perplexities): base **{_fmt(base)}** -> flock **{_fmt(main)}** "
            f"({gain:+.1f}% better)"
            + f", tau = {_tau_text(fl['tau'])}."
        )
        bl = fl.get("baselines", {})
        if bl:
            parts = [f"{k} {_fmt(v['macro_ppl'])}" for k, v in bl.items()]
            best = min([("hierarchical", main)] + [(k, v["macro_ppl"]) for k, v in bl.items()], key=lambda kv: kv[1])
            lines.append(f"Baselines on the same seed and batches: {', '.join(parts)}. Best: **{best[0]}**.")
        if len(fl["tasks"]) > MANY_TASKS:
            lines += ["", "| | base | flock |" + "".join(f" {k} |" for k in bl), "|---|---:|---:|" + "---:|" * len(bl),
                      f"| macro ppl | {_fmt(base)} | **{_fmt(main)}** |"
                      + "".join(f" {_fmt(v['macro_ppl'])} |" for v in bl.values()), ""]
            lines += render_many_md(task_rows(report), list(bl))
        else:
            lines += [
                "",
                "| task | train examples | base ppl | flock ppl |" + "".join(f" {k} ppl |" for k in bl),
                "|---|---:|---:|---:|" + "---:|" * len(bl),
            ]
            for t, r in sorted(fl["tasks"].items(), key=lambda kv: kv[1]["train_examples"]):
                row = f"| {t} | {r['train_examples']} | {_fmt(r['base_ppl'])} | {_fmt(r['eval_ppl'])} |"
                for k in bl:
                    row += f" {_fmt(bl[k]['tasks'][t]['eval_ppl'])} |"
                lines.append(row)
            lines.append(
                f"| **macro** | | {_fmt(base)} | **{_fmt(main)}** |"
                + "".join(f" {_fmt(v['macro_ppl'])} |" for v in bl.values())
            )
        lines += [""] + render_metrics_md(fl, report.get("pesc"))
        for t, why in fl.get("failed", {}).items():  # after the table: a line inside it would end it
            lines.append(f"\n**{t}** was stopped: {why}.")
        lines.append("")
        if fl.get("tau_sweep"):
            lines += ["### tau sweep (BoRA Table 1 on this suite)", "", "| tau | macro ppl |", "|---:|---:|"]
            for r in fl["tau_sweep"]:
                lines.append(f"| {r['tau']:g} | {_fmt(r['macro_ppl'])} |")
            lines += ["", _u_shape(fl["tau_sweep"]), ""]
        if fl.get("gates"):
            lines += _gates_md(fl["gates"], job.get("gates"))
        for key in ("bora_per_task", "task_gains", "metric_gains", "curves", "tau"):
            if key in plot_files:
                lines += [f"![{key}]({plot_files[key]})", ""]
    if quant:
        from orchestrator.base.quant import render_quant_md

        lines += render_quant_md(quant)
    if report.get("search"):
        from orchestrator.report.search import render_search_md

        lines += render_search_md(report["search"]) + [""]
    pe = report.get("pesc")
    if pe:
        lines += ["## PESC: mixture of adapter experts (unified, no task ids)", ""]
        rows = [("flock (hierarchical)", fl["macro_ppl"])] if fl else []
        if fl:
            rows += [(f"{k} LoRA", v["macro_ppl"]) for k, v in fl.get("baselines", {}).items()]
        rows.append(("PESC MoE", pe["macro_ppl"]))
        lines += ["| method | macro ppl |", "|---|---:|"] + [f"| {n} | {_fmt(v)} |" for n, v in rows]
        lines += ["", f"{pe['trainable_params']:,} trainable parameters; the busiest expert takes "
                  f"{pe['busiest_expert_vs_mean']:.2f}x the mean load (1.00 = perfectly even)."]
        if "expert_load" in plot_files:
            lines += ["", f"![expert load]({plot_files['expert_load']})"]
        lines.append("")
    rc = report.get("recycle")
    if rc:
        lines += ["## Recycling (EigenLoRAx)", ""]
        pk = rc.get("picked")
        if pk:  # search.pick: the recycled deployment is the picked compressed model
            lines += [f"Recycled model: the search's picked trial {pk['trial_id']} ({pk.get('bits', 16)}-bit base, "
                      f"{_fmt(pk.get('sparsity'))} of the adapted weights pruned, rank {pk.get('rank')}, "
                      f"{(pk.get('model_bytes') or 0) / 1e6:.1f} MB): its task adapters make the subspace and the "
                      "new task trains on its compressed base.", ""]
            if pk.get("quant_base"):
                lines[-1:-1] = [f"The recycled adapters belong with that trial's whole quantised base (search setting "
                                f"`{pk['base_setting']}`: every block below the adapted ones and the token embedding "
                                f"quantised), written to `{pk['quant_base']}/`; `loraflock export --what recycle` "
                                "serves them on it, dequantised."]
        lines.append(
            f"{len(rc['adapters'])} adapters -> K = {rc['k']} principal directions per module "
            f"(explained variance {rc['explained_variance']:.3f}); stored as subspace + coefficients they take "
            f"**{rc['storage_ratio']:.1f}x** less space, with a mean relative reconstruction error of "
            f"{rc['reconstruction_rel_error']:.3f} on delta W."
        )
        nt = rc.get("new_task")
        if nt:
            lines += [
                "",
                f"New task `{nt['task']}` (held out of the flock, {nt['train_examples']} training sequences), "
                "same steps:",
                "",
                "| adapter | trainable params | eval ppl |",
                "|---|---:|---:|",
                f"| {'compressed base' if pk else 'base'} | 0 | {_fmt(nt['base_ppl'])} |",
                f"| coefficients on the subspace | {nt['coeff_params']:,} | {_fmt(nt['coeff_ppl'])} |",
                f"| full LoRA r={pk['rank'] if pk else job['rank']} | {nt['lora_params']:,} | {_fmt(nt['lora_ppl'])} |",
                "",
            ]
            if nt.get("lora_ppl") is not None and nt["lora_ppl"] >= nt["base_ppl"]:
                lines.append(
                    f"The full LoRA did not improve on the base in these steps (it overfits {nt['train_examples']} "
                    f"sequences); the coefficients, with **{nt['param_ratio']:.0f}x** fewer trainable parameters, did."
                )
            elif nt.get("gain_fraction") == nt.get("gain_fraction"):  # not NaN
                lines.append(
                    f"The coefficients reach **{nt['gain_fraction'] * 100:.0f}%** of the full LoRA's perplexity gain "
                    f"with **{nt['param_ratio']:.0f}x** fewer trainable parameters."
                )
        lines.append("")
    if report.get("data"):
        from orchestrator.report.data import render_data_md

        lines += render_data_md(report["data"])
    t = report.get("timing", {})
    if t:
        lines += (
            ["## Timing", "", "| stage | seconds |", "|---|---:|"]
            + [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in t.items()]
            + [""]
        )
    lines += [
        "## Files",
        "",
        "- `adapters/<task>/`: PEFT LoRA adapters (`PeftModel.from_pretrained(base, dir)`)"
        + (" trained on the quantised base in `quant_base/` (packed safetensors + `quant.json`)" if quant else ""),
        *(
            ["- `export/`: the gate-pruned model and PEFT adapters for it (see README, FineGates)"]
            if (job.get("gates") or {}).get("export")
            else []
        ),
        "- `report.json`: every figure above, machine-readable",
        "",
    ]
    return "\n".join(lines)


def _gates_md(g: dict, settings: dict | None) -> list[str]:
    """The FineGates table: what the gates removed, per layer."""
    s = settings or {}
    lines = ["### FineGates: base weights pruned while the adapters trained", ""]
    lines.append(
        f"Target sparsity {s.get('target_sparsity', float('nan')):.2f} ({s.get('scope', 'shared')} scope); "
        f"**{g['removed_fraction'] * 100:.1f}%** of the gated layers' base weights removed"
        + (
            "; every method trained with the same gates "
            f"({', '.join(f'{k} {v * 100:.1f}%' for k, v in g['methods'].items())})."
            if len(g.get("methods", {})) > 1
            else "."
        )
    )
    lines += ["", "| gated layer | rows kept | cols kept | removed |", "|---|---:|---:|---:|"]
    for name, r in g["layers"].items():
        lines.append(f"| {name} | {r['rows_kept']} | {r['cols_kept']} | {r['removed_fraction'] * 100:.1f}% |")
    if s.get("heads"):
        lines += ["", "Query heads are gated on `o_proj`'s input (one gate per head, the same count under every KV "
                  "head): its cols kept are the kept heads times the head size, and the export drops the same "
                  "rows of `q_proj`."]
    if s.get("export"):
        lines += ["", "The pruned model is in `export/` (plain `transformers` weights + PEFT adapters for it)."]
    return lines + [""]


def _u_shape(sweep: list[dict]) -> str:
    """Say whether the sweep shows BoRA's U-shape (an interior tau beats both ends)."""
    best = min(sweep, key=lambda r: r["macro_ppl"])
    ends = (sweep[0]["tau"], sweep[-1]["tau"])
    if len(sweep) >= 3 and best["tau"] not in ends:
        return (
            f"The sweep shows BoRA's U-shape: tau = {best['tau']:g} ({_fmt(best['macro_ppl'])}) beats both "
            f"tau = {ends[0]:g} ({_fmt(sweep[0]['macro_ppl'])}) and tau = {ends[1]:g} ({_fmt(sweep[-1]['macro_ppl'])})."
        )
    return (f"No U-shape on this run: the best tau is at the end of the grid (tau = {best['tau']:g}, "
            f"{_fmt(best['macro_ppl'])}); widen the grid or train longer.")


def write_report(out: Path, report: dict) -> None:
    """Write report.json, the plots and report.md (each atomically)."""
    skipped = skipped_tasks(report)
    if skipped:
        report["skipped_tasks"] = skipped
    write_tasks_csv(out, task_rows(report))
    plot_files = plots.make_plots(out, report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report, plot_files))

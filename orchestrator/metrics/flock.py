"""The flock's live metrics: rank 0's hooks while a method trains, the driver's summary after.

While a method trains, rank 0 writes (stream ``flock/<method>``): the training loss and the
gate sparsity at every ``train.log_every`` step, its own tasks' eval losses and the prior's tau
per module group at every ``train.eval_every`` step, and each of its tasks' training loss (the
mean since the previous log) at every ``train.log_every`` step. It hears the loop only through
:class:`models.train.hooks.TrainHooks` (``on_log``, ``on_eval``). When the stage ends the driver,
which holds every worker's results, writes every task's eval curve and final loss, tau's
trajectory and PESC's expert load (stream ``flock/<method>/tasks``): the per-dataset curves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from models.train.hooks import TrainHooks
from orchestrator.metrics.sink import MetricSink

__all__ = ["with_metrics", "log_flock_results"]

def _sparsity(model: nn.Module) -> float | None:
    from models.gates.layer import gate_layers, sparsity_report

    return sparsity_report(model)["removed_fraction"] if gate_layers(model) else None


def with_metrics(hooks: TrainHooks | None, log: Callable[[str], None], sink: MetricSink, method: str,
                 tasks: list[str], model: nn.Module, prior=None) -> tuple[TrainHooks, Callable[[str], None]]:
    """``hooks`` and ``log`` that also write to ``sink`` (the caller's own callbacks still run).

    Args:
        tasks: this worker's task names by slot (``on_eval`` reports slots).
        prior: the method's prior (tau per group), if any.
    """
    hooks = hooks or TrainHooks()
    inner_eval, inner_log = hooks.on_eval, hooks.on_log

    def tau() -> dict[str, float]:
        return {f"{method}/tau/{g}": v for g, v in (getattr(prior, "tau", None) or {}).items()}

    def on_eval(step: int, nll: dict[int, float]) -> None:
        if inner_eval is not None:
            inner_eval(step, nll)
        sink.log({f"{method}/eval_loss/{tasks[s]}": v for s, v in nll.items()} | tau(), step)

    def on_log(step: int, loss: float, per_task: dict[int, float]) -> None:
        if inner_log is not None:
            inner_log(step, loss, per_task)
        sink.log({f"{method}/train_loss": loss, f"{method}/gate_sparsity": _sparsity(model)}
                 | {f"{method}/task_train_loss/{tasks[s]}": v for s, v in per_task.items()} | tau(), step)

    return replace(hooks, on_eval=on_eval, on_log=on_log), log


def log_flock_results(sink_for: Callable[[str], MetricSink], results: dict) -> None:
    """The merged flock results, per task (all workers): eval curves, final losses, tau, expert load.

    Args:
        sink_for: opens the stream of a name (the driver's :class:`MetricSink` factory).
        results: :class:`orchestrator.contracts.FlockResults`.
    """
    for method, rec in results.get("methods", {}).items():
        sink = sink_for(f"flock/{method}/tasks")
        try:
            for step, nll in rec.get("eval_curve", []):
                sink.log({f"{method}/eval_loss/{t}": v for t, v in nll.items()}, int(step))
            last = max([int(s) for s, _ in rec.get("curve", [])] or [0])
            sink.log({f"{method}/final_eval_loss/{t}": v for t, v in rec.get("eval_nll", {}).items()}, last)
            for i, h in enumerate(rec.get("tau_history") or []):
                step = int(h.get("step", i)) if isinstance(h, dict) else i
                taus = h.get("tau", h) if isinstance(h, dict) else {}
                sink.log({f"{method}/tau/{g}": v for g, v in taus.items() if isinstance(v, (int, float))}, step)
            gates = rec.get("gates")
            if gates:
                sink.log({f"{method}/gate_sparsity": gates.get("removed_fraction")}, last)
        finally:
            sink.close()
    pesc = results.get("pesc")
    if pesc:
        sink = sink_for("pesc")
        try:
            load = {f"pesc/expert_load/{layer}/expert{i}": v for layer, shares in pesc.get("expert_load", {}).items()
                    for i, v in enumerate(shares)}
            sink.log(load | {f"pesc/eval_loss/{t}": v for t, v in (pesc.get("eval_nll") or {}).items()}, 0)
        finally:
            sink.close()

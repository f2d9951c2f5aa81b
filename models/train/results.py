"""What :func:`models.train.loop.train_method` returns: one method's results on one process.

The flock worker, PESC, the Tune trial and recycling all read these names; keys are task
*slots* (positions in ``FlockData.owned``), which the orchestrator maps to task names.
"""

from __future__ import annotations

from typing_extensions import NotRequired, TypedDict

__all__ = ["MethodResult"]


class MethodResult(TypedDict):
    """One trained method on this process's tasks.

    Keys:
        eval_nll: slot -> mean eval NLL at the end (failed tasks absent).
        curve: ``(step, weighted train NLL)`` every ``log_every`` steps and at the last.
        eval_curve: ``(step, {slot: eval NLL})`` every ``eval_every`` steps (only when > 0).
        seconds: training wall time (no final evaluation).
        tokens_per_s: training tokens per second on this process.
        failed: slot -> why the task was stopped (its loss became NaN/inf).
        tau / tau_history: the prior's final tau per group and its updates (with a prior).
    """

    eval_nll: dict[int, float]
    curve: list[tuple[int, float]]
    eval_curve: NotRequired[list[tuple[int, dict[int, float]]]]
    seconds: float
    tokens_per_s: float
    failed: dict[int, str]
    tau: NotRequired[dict[str, float]]
    tau_history: NotRequired[list[dict]]

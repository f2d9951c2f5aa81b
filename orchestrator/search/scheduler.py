"""Successive halving on two objectives: ASHA's rungs, a Pareto dominance rule to stop trials.

Ray's ``ASHAScheduler`` ranks trials on one metric. On ``macro_ppl`` alone it stops the
compressed trials (fewer bits, pruned rows) first, because compression costs some
perplexity, and those are exactly the trials that make the cheap end of the Pareto front:
in the first demo ASHA stopped 6 of 8 trials and the front kept 2 points. Multi-objective
Optuna has the same problem with any one-metric scheduler (Ray's ASHA takes one metric).

:class:`ParetoASHA` keeps ASHA's asynchronous rungs (``grace_period * reduction_factor**k``
in ``time_attr`` units, below ``max_t``) and replaces "worse than the ``1 - 1/eta`` quantile"
by its two-objective analogue (MO-ASHA, Schmucker et al. 2021, with a dominance count):
a trial reaching a rung is stopped when at least ``ceil(n / eta)`` of the ``n`` trials
recorded earlier at that rung *dominate* it (no worse on both objectives, better on one).
With one objective this is ASHA's rule; with two, every trial on the rung's running front
goes on, and a trial is stopped only by trials that are at least as small and better.

The size objective at a rung is ``rung_bytes = min(model_bytes, target_bytes)``: gates close
over training (about ``1.55 / gate_lr`` steps), so a gated trial measured at an early rung
still looks dense; ``target_bytes`` is its size once it reaches its target sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.search.pareto import dominates

__all__ = ["ParetoASHA", "FinalOnlyOptunaSearch", "rungs"]


def rungs(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """The rung milestones below ``max_t``: ``grace_period * reduction_factor**k``."""
    out, m = [], float(grace_period)
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving that stops a trial only when enough trials dominate it.

    Args:
        time_attr: the monotonic progress key of the results (``step``).
        metrics: the objectives (``macro_ppl`` or ``macro_<task metric>``, ``rung_bytes``).
        modes: ``min`` or ``max`` per metric (``None``: all minimised).
        max_t: the trials' length in ``time_attr`` units (no rung at or above it).
        grace_period: the first rung.
        reduction_factor: eta: rungs grow by eta and about 1/eta of a rung's trials go on.

    Example:
        >>> ParetoASHA("step", ("macro_ppl", "rung_bytes"), max_t=30, grace_period=10, reduction_factor=2)
    """

    def __init__(
        self,
        time_attr: str = "step",
        metrics: Sequence[str] = ("macro_ppl", "rung_bytes"),
        max_t: float = 100,
        grace_period: float = 1,
        reduction_factor: float = 2.0,
        modes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < grace_period <= max_t or reduction_factor <= 1:
            raise ValueError("ParetoASHA needs 0 < grace_period <= max_t and reduction_factor > 1")
        self._time_attr, self._metrics = time_attr, tuple(metrics)
        self._modes = tuple(modes) if modes is not None else ("min",) * len(self._metrics)
        self._rf = float(reduction_factor)
        self._rungs: list[tuple[float, dict[str, dict]]] = [
            (m, {}) for m in rungs(grace_period, reduction_factor, max_t)
        ]
        self._num_stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are fixed here; TuneConfig's metric/mode do not apply

    def _record(self, trial_id: str, result: dict, decide: bool) -> str:
        if self._time_attr not in result or any(result.get(k) is None for k in self._metrics):
            return TrialScheduler.CONTINUE
        t = result[self._time_attr]
        for milestone, recorded in reversed(self._rungs):  # the highest rung reached, once per trial
            if t < milestone or trial_id in recorded:
                continue
            point = {k: float(result[k]) for k in self._metrics}
            action = TrialScheduler.CONTINUE
            if decide and recorded:
                beaten = sum(dominates(p, point, self._metrics, self._modes) for p in recorded.values())
                if beaten >= math.ceil(len(recorded) / self._rf):
                    action = TrialScheduler.STOP
            recorded[trial_id] = point
            return action
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._record(trial.trial_id, result, decide=True)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result:
            self._record(trial.trial_id, result, decide=False)

    def debug_string(self) -> str:
        return f"ParetoASHA: {self._num_stopped} stopped; rungs " + ", ".join(
            f"{m:g} ({len(r)} trials)" for m, r in self._rungs)


class FinalOnlyOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that tells the study only final results.

    Ray tells a multi-objective study every ended trial's last result as COMPLETE; a trial
    stopped by the scheduler ended on a subset eval after fewer steps, which TPE should not
    learn from as if it were a finished point, so it is told PRUNED. (Multi-objective
    Optuna takes no intermediate values, so Optuna's own pruners cannot act: early stopping
    is :class:`ParetoASHA`'s, on both objectives.)
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        final = bool(result) and bool(result.get("final"))
        super().on_trial_complete(trial_id, result if final else None, error)

"""What a caller plugs into :func:`models.train.loop.train_method`: the prior and the hooks.

Callers (the flock worker, PESC, the Tune trial, recycling) used to pass loose keyword
arguments that each meant a different moment of the loop; here they are one typed object,
so the loop's contract with its callers is visible in one place and a new caller cannot
half-wire it. Plain Python and torch: models/ never sees the orchestrator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Prior", "ExtraParams", "TrainHooks"]


@runtime_checkable
class Prior(Protocol):
    """What the loop needs of a hierarchical prior (:class:`models.prior.HierarchicalPrior` is one).

    The loop adds :meth:`penalty` to the loss, asks :meth:`due` after every step whether to
    update tau from the all-reduced :meth:`stats_tensor`, checkpoints it with
    :meth:`state_dict`, and reports ``tau`` and ``history`` when the method ends.
    """

    tau: dict[str, float]
    history: list[dict]

    def penalty(self) -> torch.Tensor: ...

    def due(self, step: int) -> bool: ...

    def stats_tensor(self) -> torch.Tensor: ...

    def update_tau(self, stats: torch.Tensor, step: int | None = None) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class ExtraParams:
    """More trainable parameters in their own optimizer group: FineGates' gate logits.

    This is the one way a component gets its own learning rate inside the loop's single
    AdamW (the gates need ~100x the adapters' step size to close within the run).

    Attributes:
        params: the parameters (they are set trainable).
        lr: their step size; ``None`` = the method's ``lr``. Weight decay is 0 for them.
        local: ``True`` = never all-reduced across workers (task-scope gates); ``False`` =
            replicated, their gradient all-reduced like Theta's (shared gates).
    """

    params: Sequence[nn.Parameter]
    lr: float | None = None
    local: bool = False


@dataclass
class TrainHooks:
    """The moments of :func:`~models.train.loop.train_method` a caller can act on.

    Attributes:
        extra_loss: a regulariser added to every step's loss (gate sparsity, MoE balance),
            normalised like the NLL; the prior's penalty is added by the loop itself.
        on_step: ``on_step(step)`` before step ``step`` (1-based) runs (the gate schedule).
        before_eval: between training and the final evaluation (harden gates, reset counters).
        on_eval: ``on_eval(step, {slot: nll})`` after every periodic evaluation
            (``MethodConfig.eval_every``; not the final one, which the result carries):
            the Tune trial reports to its scheduler here.
        on_log: ``on_log(step, loss, {slot: nll})`` at every ``MethodConfig.log_every`` step:
            the step's weighted training NLL and each task's mean training NLL over the rows it
            had since the previous log (tasks without rows in that window are absent); live
            metrics write it as per-task training curves.
        extra_params: parameters with their own learning rate (see :class:`ExtraParams`).
    """

    extra_loss: Callable[[], torch.Tensor] | None = None
    on_step: Callable[[int], None] | None = None
    before_eval: Callable[[], None] | None = None
    on_eval: Callable[[int, dict[int, float]], None] | None = None
    on_log: Callable[[int, float, dict[int, float]], None] | None = None
    extra_params: ExtraParams | None = None

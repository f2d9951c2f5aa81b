"""The ``gates:`` section of a job: FineGates pruning of the frozen base during the flock.

Kept apart from ``orchestrator.spec`` (which assembles the whole job) because the gate
schedule has many knobs of its own; ``orchestrator.spec`` re-exports :class:`GatesSpec`.

Example (YAML, inside a job)::

    gates:
      enabled: true
      target_sparsity: 0.3
      target_modules: [down_proj]
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from tasks.strict import Strict

__all__ = ["GatesSpec"]


class GatesSpec(Strict):
    """FineGates in the flock: stochastic gates prune the frozen base while the adapters train.

    Every method of the flock (hierarchical, the baselines, tau-sweep points) trains with the
    same gates and schedule, so their comparison stays fair; PESC runs ungated. At the end
    the hierarchical flock is exported as a smaller plain ``transformers`` model plus PEFT
    adapters for it (``export/``). Schedule: see ``models.gates.schedule``.

    Args:
        enabled: train gates.
        target_sparsity: fraction of gates closed at the end (with the default targets: of
            the MLP intermediate channels, i.e. of the gated layers' weights).
        scope: ``shared`` (one pruned base for every task) or ``task`` (a pruned base per task).
        lambda: weight of the penalty ``(mean P_open - (1 - target))^2`` after warm-up.
        target_modules: layers to gate; default ``down_proj`` (Llama family; GPT-2:
            ``mlp.c_proj``), whose input columns are the MLP channels the export removes.
        sides: gate the layers' input columns (``cols``), output rows (``rows``) or ``both``.
        heads: also gate attention heads, one gate per query head on ``o_proj``'s input
            (``models.gates.heads``); ``target_sparsity`` of each KV head's query heads are
            closed (rounded, never all) and the export removes them. MLP channels alone leave
            attention and the head whole (SmolLM2: 1.19x at a third of the channels).
            Llama-family attention only (``q_proj``...``o_proj``); ``o_proj`` must not be in
            ``target_modules`` too.
        layers: ``adapted`` (the blocks with adapters, ``lora.top_layers``: the frozen
            blocks below stay cached) or ``all`` blocks (no prefix cache: slower).
        gate_lr: step size of the gate logits; ``None`` = just enough to close the target
            quantile by the hardening step (``GateSchedule.auto_gate_lr``).
        warmup: fraction of the steps over which the penalty ramps up from 0.
        sigma / sigma_final: training noise at the first step / at the hardening step.
        harden_at: fraction of the steps after which the gates are a binary mask with
            ``target_sparsity`` closed (more with ``align > 1``, see ``align``; 1.0 = never:
            only gates that reached 0 are removed).
        allocation: ``layer`` (the same closed fraction in every gated layer: the exported
            blocks keep one width) or ``global``.
        align: with ``layer`` allocation, round every layer's kept width down to a multiple
            of this, so more than ``target_sparsity`` is removed (1 = exact). 64 suits CPU and
            GPU matmul kernels: SmolLM2's MLP at width 1,075 (30% removed) runs 1.10x faster
            than 1,536, at 1,024 1.24x (benchmarks/README.md).
        init: ``importance`` (theta from activation-weighted weight norms on
            ``calibration_batches`` training batches), ``taylor`` (from the first-order loss
            change of closing each gate, one backward pass per batch) or ``constant``
            (theta ~ N(1, 0.1)).
        export: write ``export/`` at the end.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    enabled: bool = False
    target_sparsity: float = Field(0.3, ge=0, lt=1)
    scope: Literal["shared", "task"] = "shared"
    lam: float = Field(50.0, ge=0, alias="lambda")
    target_modules: list[str] = Field(default_factory=lambda: ["down_proj"], min_length=1)
    sides: Literal["cols", "rows", "both"] = "cols"
    heads: bool = False
    layers: Literal["adapted", "all"] = "adapted"
    gate_lr: float | None = Field(None, gt=0)
    warmup: float = Field(0.2, ge=0, le=1)
    sigma: float = Field(0.1, ge=0)
    sigma_final: float = Field(0.0, ge=0)
    harden_at: float = Field(0.75, gt=0, le=1)
    allocation: Literal["layer", "global"] = "layer"
    align: int = Field(1, ge=1, le=4096)
    init: Literal["importance", "taylor", "constant"] = "importance"
    calibration_batches: int = Field(4, ge=1)
    export: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> GatesSpec:
        if self.enabled and self.target_sparsity <= 0:
            raise ValueError("gates.target_sparsity must be > 0 when gates are enabled (e.g. 0.3)")
        if self.sigma_final > self.sigma:
            raise ValueError(
                f"gates.sigma_final ({self.sigma_final}) must be <= gates.sigma ({self.sigma}): the noise anneals down"
            )
        if self.harden_at <= self.warmup and self.harden_at < 1.0:
            raise ValueError(
                f"gates.harden_at ({self.harden_at}) must come after the warm-up (gates.warmup = {self.warmup})"
            )
        if self.heads and any(m.split(".")[-1] == "o_proj" for m in self.target_modules):
            raise ValueError(f"gates.heads puts the head gates on o_proj: take o_proj out of gates.target_modules "
                             f"({self.target_modules}), or set heads: false")
        if self.align > 1 and self.allocation != "layer":
            raise ValueError(f"gates.align ({self.align}) needs gates.allocation: layer (global allocation gives "
                             "layers different widths): set allocation: layer, or align: 1")
        return self

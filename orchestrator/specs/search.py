"""The ``search:`` section of a job: Ray Tune over a compression space, two-objective successive halving, a Pareto pick.

Example (YAML, inside a job)::

    search:
      enabled: true
      space: demo              # tune_spaces/demo.yaml, or a path to a space file
      num_samples: 8
      steps: 30                # per trial (default: train.steps)
      eval_every: 10           # intermediate macro_ppl on a small eval subset (the scheduler's signal)
      grace_period: 10
      max_concurrent_trials: 2
      pick: {max_bytes: 200000000}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.strict import Strict

__all__ = ["PickSpec", "SearchSpec"]


class PickSpec(Strict):
    """How the job picks one point of the Pareto front (exactly one rule).

    The picked trial's compressed model (its bits, LQ-quantised and pruned base, and adapters)
    becomes the recycle stage's input: the subspace is built from its task adapters and a new
    task is adapted on its compressed base.

    Args:
        max_bytes: the lowest macro perplexity among points with ``model_bytes <= max_bytes``.
        max_ppl: the smallest model among points with ``macro_ppl <= max_ppl``.
        on_miss: when no point meets the rule: ``closest`` takes the point nearest to it (the
            smallest model for ``max_bytes``, the lowest perplexity for ``max_ppl``) and the
            report says the rule was not met (``search.picked.met: false``); ``error`` fails
            the stage (its trials and front are written first).
    """

    max_bytes: int | None = Field(None, gt=0)
    max_ppl: float | None = Field(None, gt=1.0)
    on_miss: Literal["closest", "error"] = "closest"

    @model_validator(mode="after")
    def _one_rule(self) -> PickSpec:
        if (self.max_bytes is None) == (self.max_ppl is None):
            raise ValueError("search.pick needs exactly one of `max_bytes` or `max_ppl`")
        return self


class SearchSpec(Strict):
    """Ray Tune compression search (rank, gate sparsity, base bits, tau, lr).

    Every trial trains one single-process flock of all tasks on the base (adapters, gates
    and quantisation on the top ``lora.top_layers`` blocks only) with the shared training
    loop, and reports ``macro_ppl`` and the deployed ``model_bytes``.

    Args:
        enabled: run the stage.
        space: a bundled space name (``default``, ``demo``, ``gpu``) or a YAML path.
        num_samples: samples drawn from the space (times the grid size if it has ``grid``).
        steps: training steps per trial; ``None`` = ``train.steps``.
        eval_every: steps between intermediate reports (the scheduler sees them at its rungs); <= steps.
        eval_subset: eval sequences per task for intermediate reports (the final report
            uses the whole eval set).
        grace_period: steps every trial runs before the scheduler may stop it (the first rung).
        reduction_factor: eta: rungs at ``grace_period * eta**k`` steps; a trial is stopped at a
            rung when at least ``ceil(n / eta)`` of the ``n`` trials recorded there before it
            dominate it in (macro_ppl, size) (:class:`orchestrator.search.scheduler.ParetoASHA`).
        max_concurrent_trials: trials at once; ``None`` = cluster CPUs // cpus_per_trial.
        cpus_per_trial: CPUs (torch threads) of each trial.
        gpus_per_trial: GPUs of each trial with ``ray.use_gpu``: a fraction in (0, 1] lets that many
            trials share one GPU (0.25: four small trials per GPU; Ray only counts shares, so the
            trials' memory must fit together), or a whole number. Concurrency is sized from
            GPUs as well as CPUs, node by node.
        quantizer: trials' base quantiser when the space has no ``quantizer`` dimension; unset:
            ``base.quant.quantizer`` when the job quantises its base, else ``nf``.
        lq_iters: LQ-LoRA alternations (Q, L1 L2^T) per quantised matrix; unset: as for ``quantizer``.
        gate_lambda: weight of the gate sparsity penalty (FineGates' lambda).
        gate_lr: step size of the gate logits (Adam moves a gate ~gate_lr per step; gates
            start open at theta = 1 and close below theta = -0.55).
        algorithm: ``random`` (Ray's variant generator: random + grid) or ``optuna``
            (multi-objective TPE on (macro_ppl, model_bytes); needs ``pip install optuna``).
        pick: the rule that picks the deployed point of the front.
        seed: seed of the sampled configurations (trials train with ``train.seed``).
        packing: run ungated trials as slot groups on one long-lived host per (node, base
            setting) that holds the (quantised) base and prefix cache and fuses concurrent
            trials' steps (``orchestrator/search/packed_trial.py``); same metrics as unpacked trials.
            A GPU feature: on CPU it is slower (measured 0.64x on 2 cores: fusing saves no
            FLOPs there, and one 2-thread host is ~71% as efficient as two 1-thread trials).
    """

    enabled: bool = False
    space: str = "default"
    num_samples: int = Field(8, ge=1)
    steps: int | None = Field(None, ge=1)
    eval_every: int = Field(10, ge=1)
    eval_subset: int = Field(4, ge=1)
    grace_period: int = Field(10, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: float = Field(1.0, gt=0)
    quantizer: Literal["nf", "uniform", "vq"] = "nf"
    lq_iters: int = Field(2, ge=1, le=20)
    gate_lambda: float = Field(50.0, ge=0)
    gate_lr: float = Field(0.1, gt=0)
    algorithm: Literal["random", "optuna"] = "random"
    pick: PickSpec | None = None
    seed: int = 0
    packing: bool = False

    @field_validator("space")
    @classmethod
    def _space_exists(cls, v: str) -> str:
        from tune_spaces.loader import load_space

        load_space(v)  # SpaceError (a ValueError) names the file and key
        return v

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray places fractions only within one GPU
            raise ValueError(
                f"search.gpus_per_trial = {v:g}: use a fraction in (0, 1] (trials sharing a GPU) or a whole "
                "number of GPUs"
            )
        return v

    @model_validator(mode="after")
    def _optuna_space(self) -> SearchSpec:
        if self.algorithm == "optuna":
            from tune_spaces.loader import load_space, to_optuna

            to_optuna(load_space(self.space))  # `grid` dimensions: a SpaceError saying to use `choice`
        return self

    @model_validator(mode="after")
    def _grace_fits(self) -> SearchSpec:
        if self.steps is not None and (self.grace_period > self.steps or self.eval_every > self.steps):
            raise ValueError(
                f"search.grace_period ({self.grace_period}) and search.eval_every ({self.eval_every}) must be "
                f"<= search.steps ({self.steps})"
            )
        return self

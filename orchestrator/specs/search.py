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

On a task metric instead of perplexity (the tasks judged by it: ``eval:`` / per-task ``metrics``)::

    search:
      enabled: true
      metric: exact_match      # macro over the tasks judged by exact_match, maximised, against bytes
      metric_rows: 32          # judged on a fixed, seeded subset of each task's eval rows
      pick: {min_metric: {exact_match: 0.8}}   # the smallest model with macro exact match >= 0.8
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from tasks.metric_spec import GENERATION_METRICS, Metric
from tasks.strict import Strict

if TYPE_CHECKING:
    from orchestrator.specs.eval import EvalSpec
    from tasks.spec import TaskSetSpec, TaskSpec

__all__ = ["PickSpec", "SearchSpec", "objective"]


def objective(metric: str) -> tuple[str, str]:
    """The trials' objective key and its mode for ``search.metric``: ``("macro_ppl", "min")``,
    ``("macro_exact_match", "max")``..."""
    return f"macro_{metric}", "min" if metric == "ppl" else "max"


class PickSpec(Strict):
    """How the job picks one point of the Pareto front (exactly one rule).

    The picked trial's compressed model (its bits, LQ-quantised and pruned base, and adapters)
    becomes the recycle stage's input: the subspace is built from its task adapters and a new
    task is adapted on its compressed base.

    Args:
        max_bytes: the best point on the search's objective (the lowest macro perplexity, or
            the highest macro ``search.metric``) among points with ``model_bytes <= max_bytes``.
        max_ppl: the smallest model among points with ``macro_ppl <= max_ppl``.
        min_metric: ``{metric: bound}``, one entry, the search's ``metric``: the smallest model
            among points whose macro metric is ``>= bound`` (e.g. ``{exact_match: 0.8}``).
        on_miss: when no point meets the rule: ``closest`` takes the point nearest to it (the
            smallest model for ``max_bytes``, the lowest perplexity for ``max_ppl``, the highest
            metric for ``min_metric``) and the report says the rule was not met
            (``search.picked.met: false``); ``error`` fails the stage (its trials and front are
            written first).
    """

    max_bytes: int | None = Field(None, gt=0)
    max_ppl: float | None = Field(None, gt=1.0)
    min_metric: dict[Metric, float] | None = None
    on_miss: Literal["closest", "error"] = "closest"

    @model_validator(mode="after")
    def _one_rule(self) -> PickSpec:
        if sum(r is not None for r in (self.max_bytes, self.max_ppl, self.min_metric)) != 1:
            raise ValueError("search.pick needs exactly one of `max_bytes`, `max_ppl` or `min_metric`")
        if self.min_metric is not None:
            if len(self.min_metric) != 1 or "ppl" in self.min_metric:
                raise ValueError(
                    f"search.pick.min_metric {self.min_metric} must hold one task metric and its lower bound, e.g. "
                    "{exact_match: 0.8} (a perplexity bound is max_ppl)"
                )
            bound = next(iter(self.min_metric.values()))
            if not 0.0 <= bound <= 1.0:
                raise ValueError(f"search.pick.min_metric bound {bound} is outside [0, 1], where task metrics lie")
        return self


class SearchSpec(Strict):
    """Ray Tune compression search (rank, gate sparsity, base bits, tau, lr).

    Every trial trains one single-process flock of all tasks on the base (adapters, gates
    and quantisation on the top ``lora.top_layers`` blocks only) with the shared training
    loop, and reports ``macro_ppl``, the deployed ``model_bytes`` and, with a task ``metric``,
    ``macro_<metric>``.

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
        max_concurrent_trials: trials at once; ``None`` = as many as the nodes hold, CPUs and GPU shares
            counted node by node.
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
        metric: the quality objective against bytes: ``ppl`` (``macro_ppl``, minimised) or a task
            metric (``exact_match``, ``accuracy``, ``choice_accuracy``, ``rouge_l``:
            ``macro_<metric>``, the mean over the tasks judged by it, maximised). Every report
            (each rung and the final one) judges it, so successive halving and the front use
            it; ``macro_ppl`` is still reported. Packed trials (``packing``) are judged alike, on
            their pack host through their own slot group.
        metric_rows: eval rows per task a task metric is judged on: the same seeded subset
            (``seed``) at every report of every trial, all tasks mixed in each batch (``eval.batch_size``).
        seed: seed of the sampled configurations (trials train with ``train.seed``).
        quantize_layers: which blocks a quantised trial (``bits`` < 16 or ``bit_budget``)
            quantises: ``adapted`` (the top ``lora.top_layers``, LQ-LoRA under the adapter) or
            ``all`` (the frozen blocks below too, plain ``Q``: each base setting of the space is
            quantised once, with its own frozen-prefix cache shared by every trial using it;
            :mod:`orchestrator.search.frozen_base`). A picked whole-base trial's quantised frozen
            blocks and embedding are written to ``out/search/pick/quant_base/``; recycling and
            ``loraflock export --what pick`` rebuild the trial on them.
        packing: run ungated trials as slot groups on one long-lived host per (node, base
            setting) that holds the (quantised) base and prefix cache and fuses concurrent
            trials' steps (``orchestrator/search/packed_trial.py``); same metrics as unpacked trials,
            a task ``metric`` included (the host judges each trial through its slots, on the same rows).
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
    metric: Metric = "ppl"
    metric_rows: int = Field(32, ge=1)
    seed: int = 0
    packing: bool = False
    quantize_layers: Literal["adapted", "all"] = "adapted"

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
    def _whole_base(self) -> SearchSpec:
        if self.quantize_layers == "all" and self.metric != "ppl":
            raise ValueError(f"search.metric {self.metric!r} with search.quantize_layers: all is not supported yet (a "
                             "trial judges its metric on whole sequences, and its frozen blocks stay unquantised: only "
                             "their prefix cache is): use metric: ppl, or quantize_layers: adapted")
        if self.quantize_layers == "all":
            from orchestrator.search.frozen_base import space_settings
            from tune_spaces.loader import load_space

            space_settings(load_space(self.space).dimensions)  # continuous bits / bit_budget: named, with the fix
        elif self.enabled:
            from tune_spaces.loader import load_space

            budget = load_space(self.space).dimensions.get("bit_budget")
            if budget is not None and any(float(v) < 16 for v in budget.values):
                raise ValueError(
                    f"search.space {self.space!r} has a bit_budget dimension, an average over the whole base's "
                    "matrices, but search.quantize_layers is 'adapted' (only the top blocks are quantised, at one "
                    "width each): set search.quantize_layers: all, or use a bits dimension"
                )
        return self

    @model_validator(mode="after")
    def _grace_fits(self) -> SearchSpec:
        if self.steps is not None and (self.grace_period > self.steps or self.eval_every > self.steps):
            raise ValueError(
                f"search.grace_period ({self.grace_period}) and search.eval_every ({self.eval_every}) must be "
                f"<= search.steps ({self.steps})"
            )
        return self

    @model_validator(mode="after")
    def _metric_fits(self) -> SearchSpec:
        bound = self.pick.min_metric if self.pick is not None else None
        if bound is not None and next(iter(bound)) != self.metric:
            raise ValueError(
                f"search.pick.min_metric bounds {next(iter(bound))!r} but the search optimises {self.metric!r}, and "
                f"trials judge only that: set search.metric: {next(iter(bound))}, or bound {self.metric!r}"
            )
        return self

    def check_metric(self, eval_spec: EvalSpec, entries: Iterable[TaskSpec | TaskSetSpec]) -> None:
        """Raise ValueError when no task of the search is judged by ``metric`` (it names the tasks' metrics)."""
        if self.metric == "ppl":
            return
        judged = {e.name: eval_spec.for_task(e).metrics for e in entries}
        if any(self.metric in m for m in judged.values()):
            return
        hint = ""
        if self.metric in GENERATION_METRICS:
            hint = f" ({self.metric} judges greedy generations: `text` tasks cannot have it)"
        raise ValueError(
            f"search.metric {self.metric!r}: no task of the search is judged by it{hint}; the tasks and task sets are "
            f"judged by {judged}: add {self.metric} to eval.metrics or to a task's metrics, or pick one of theirs"
        )

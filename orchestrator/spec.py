"""The job spec: one YAML file, validated by pydantic v2 (``extra="forbid"`` everywhere).

``loraflock validate JOB.yaml`` prints every problem with its field path; ``loraflock schema``
prints the JSON schema. The spec crosses into Ray as ``model_dump()`` and is re-validated
on the other side, so workers never see an unchecked value.

The larger sections live in their own modules (``base_spec``: ``base:``, ``gates_spec``:
``gates:``, ``search_spec``: ``search:``) and are re-exported here, so
``from orchestrator.spec import BaseSpec`` keeps working.

Example:
    >>> spec = load_job("examples/tiny.yaml")
    >>> spec.lora.rank
    8
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.errors import SpecError
from orchestrator.specs.base import QUANT_BITS, BaseSpec, QuantSpec  # noqa: F401  (QUANT_BITS: re-exported)
from orchestrator.specs.eval import EvalSpec
from orchestrator.specs.gates import GatesSpec
from orchestrator.specs.prefix_cache import PrefixCacheSpec
from orchestrator.specs.search import SearchSpec
from tasks.spec import TaskSetSpec, TaskSpec
from tasks.strict import Strict

__all__ = [
    "BaseSpec",
    "QuantSpec",
    "LoraSpec",
    "TrainSpec",
    "PriorSpec",
    "FlockSpec",
    "PescSpec",
    "RecycleSpec",
    "RaySpec",
    "GatesSpec",
    "EvalSpec",
    "JobSpec",
    "load_job",
    "parse_job",
    "format_validation_error",
]


class LoraSpec(Strict):
    """LoRA defaults for every task.

    Args:
        rank: adapter rank r.
        alpha: scaling numerator (delta W = alpha / r * B A).
        dropout: dropout on the adapter input (one mask per row for all slots).
        target_modules: module leaf names to adapt.
        top_layers: adapt only the top N blocks (the frozen blocks below run once per sequence
            while it is cached, see ``flock.prefix_cache``: the big saving on CPU). ``None`` = every block.
        ranks: per-task rank overrides ``{task: r}``.
    """

    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    top_layers: int | None = Field(None, ge=1)
    ranks: dict[str, int] = Field(default_factory=dict)

    @field_validator("ranks")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1: {bad}")
        return v


class TrainSpec(Strict):
    """Training settings shared by every method of the flock (same seed, same batches).

    Args:
        steps: optimisation steps per method.
        batch_size: rows per mixed-task batch (global, over all workers).
        seq_len: tokens per packed row.
        lr: AdamW learning rate.
        temperature: task sampling ~ N_d ** temperature (0.5: small tasks seen more often).
        eval_every: evaluate every N steps (0 = only at the end).
        checkpoint_every: checkpoint adapters + optimizer every N steps (0 = end of each method).
    """

    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8, le=32768)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    temperature: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # the flock's methods; report.json: flock.eval_curves
    checkpoint_every: int = Field(0, ge=0)


class PriorSpec(Strict):
    """The hierarchical prior's precisions.

    Args:
        groups: ``module`` (one tau per target-module name) or ``global`` (one tau).
        a: Gamma(a, b) hyperprior shape (``tau: infer``).
        b: Gamma(a, b) hyperprior rate (a / b = 100: the prior mean of tau).
        tau_init: starting tau when inferred.
        update_every: steps between empirical-Bayes updates of tau.
        tau_max: cap for inferred tau (deltas start at zero, where the posterior says "tie").
    """

    groups: Literal["module", "global"] = "module"
    a: float = Field(1.0, gt=0)
    b: float = Field(0.01, gt=0)
    update_every: int = Field(10, ge=1)
    tau_init: float = Field(100.0, gt=0)
    tau_max: float = Field(1e4, gt=0)


class FlockSpec(Strict):
    """The BoRA flock stage.

    Args:
        tau: prior precision: a number (0 = independent adapters) or ``infer``.
        baselines: also train the independent (tau = 0) and unified (one shared adapter)
            baselines on the same batches, for the report's comparison.
        tau_sweep: optional list of tau values, each trained like the flock (Table 1 of BoRA).
        sync_every: steps between syncs of the shared Theta across workers (1 = exact joint MAP).
        prior_update: how the task offsets step: ``dense`` (every task's rows every step, the
            literal joint MAP; a step's cost grows with the tasks), ``lazy`` (only the batch's
            tasks; idle offsets get the prior's pull in closed form when next used, see
            ``models/train/lazy.py`` for the approximation and its measured tolerance) or
            ``auto`` (lazy once a worker owns more than 64 tasks).
        prefix_cache: the frozen lower blocks' states, computed on demand and kept within a
            per-worker memory budget (:class:`orchestrator.specs.prefix_cache.PrefixCacheSpec`).
    """

    enabled: bool = True
    tau: float | Literal["infer"] = 100.0
    prior: PriorSpec = Field(default_factory=PriorSpec)
    baselines: list[Literal["independent", "unified"]] = Field(default_factory=lambda: ["independent", "unified"])
    tau_sweep: list[float] | None = None
    sync_every: int = Field(1, ge=1)
    prior_update: Literal["auto", "dense", "lazy"] = "auto"
    prefix_cache: PrefixCacheSpec = Field(default_factory=PrefixCacheSpec)

    @field_validator("tau")
    @classmethod
    def _tau_ok(cls, v: float | str) -> float | str:
        if isinstance(v, float) and (v < 0 or math.isnan(v)):
            raise ValueError("tau must be >= 0 (0 = independent adapters) or `infer`")
        return v

    @field_validator("tau_sweep")
    @classmethod
    def _sweep_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(t < 0 or math.isnan(t) for t in v):
            raise ValueError("every tau in tau_sweep must be >= 0")
        return v


class PescSpec(Strict):
    """The PESC stage: the FFN of every adapted block becomes a mixture of adapter experts.

    Trained on all tasks pooled (no task ids reach the router), with the flock's steps and
    batches, plus one shared LoRA on the attention projections, as PESC does.

    Args:
        num_experts: E experts per FFN block.
        top_k: experts per token.
        bottleneck: expert adapter width (U_i GELU(D_i h)).
        scale: expert output scale s.
        balance_coef: weight of the Switch load-balancing loss ``E * sum_i f_i P_i``.
    """

    enabled: bool = False
    num_experts: int = Field(8, ge=2, le=256)
    top_k: int = Field(2, ge=1)
    bottleneck: int = Field(64, ge=1)
    scale: float = Field(1.0, gt=0)
    balance_coef: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _k_le_e(self) -> PescSpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


class RecycleSpec(Strict):
    """The recycle stage (EigenLoRAx).

    Args:
        k: principal directions per module; ``None`` = the smallest K reaching
            ``explained_variance``.
        explained_variance: threshold used when ``k`` is not given.
        sources: extra PEFT LoRA adapter directories (same base and target modules).
        new_task: a task held out of the flock, adapted on the subspace (coefficients only)
            and, for comparison, with a full LoRA; both with the same steps.
        steps: training steps for the new task (default: ``train.steps``).
        lr: learning rate of the coefficients (default: ``train.lr``).
        k_extra: random Gram-Schmidt directions added per side (low-resource option).
    """

    enabled: bool = False
    k: int | None = Field(None, ge=1)
    explained_variance: float = Field(0.9, gt=0, le=1)
    sources: list[str] = Field(default_factory=list)
    new_task: TaskSpec | None = None
    steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    k_extra: int = Field(0, ge=0)


class RaySpec(Strict):
    """Where and how the job runs on Ray.

    Args:
        address: Ray cluster address; ``None`` starts an embedded local Ray.
        num_workers: Ray Train workers for the flock (tasks are split between them by size).
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs per worker; ``None`` = an equal share of the node.
        include_dashboard: start the dashboard for a local Ray (bound to 127.0.0.1).
        max_failures: restarts of a failed worker group from its last checkpoint.
        share_base: put the frozen base in Ray's object store once per node, mapped read-only
            by every worker (instead of one copy per worker).
    """

    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0)
    include_dashboard: bool = False
    max_failures: int = Field(2, ge=0)
    share_base: bool = True


class JobSpec(Strict):
    """One loraflock job.

    Example (YAML)::

        name: tiny
        base: {random_init: {model_type: llama, hidden_size: 64, ...}, tokenizer: bytes}
        tasks:
          - {name: json, source: {kind: builtin, suite: stdlib-code, package: json}}
        lora: {rank: 8, target_modules: [q_proj, v_proj]}
        train: {steps: 20, batch_size: 4, seq_len: 64}

    Args:
        tasks: explicit tasks (may be empty when ``task_sets`` gives at least one set).
        task_sets: sets that expand one table (split by a column) or a glob of files into many
            tasks when the data is built (:class:`tasks.spec.TaskSetSpec`).
        report_to: stream live metrics to these backends (``tensorboard``, ``mlflow``, ``wandb`` in
            offline mode), under ``<out>/metrics/``; MLflow follows ``MLFLOW_TRACKING_URI`` when set.
        chat_template: for ``messages`` sources: ``chatml`` or a jinja template string; it
            replaces the tokenizer's own template (as Axolotl's top-level ``chat_template``),
            and is required when the tokenizer has none.
        eval: the metrics every task is judged by (each task or task set may override them).
    """

    name: str = Field("loraflock-job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    base: BaseSpec
    tasks: list[TaskSpec] = Field(default_factory=list)
    task_sets: list[TaskSetSpec] = Field(default_factory=list)
    chat_template: str | None = Field(None, min_length=1)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    flock: FlockSpec = Field(default_factory=FlockSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    pesc: PescSpec = Field(default_factory=PescSpec)
    recycle: RecycleSpec = Field(default_factory=RecycleSpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    # live metrics from the driver / rank 0 (orchestrator.metrics): tensorboard, mlflow, wandb (offline)
    report_to: list[str] = Field(default_factory=list)

    @field_validator("report_to")
    @classmethod
    def _report_to_ok(cls, v: list[str]) -> list[str]:
        from orchestrator.specs.metrics import check_report_to

        return check_report_to(v)

    @field_validator("chat_template")
    @classmethod
    def _template_ok(cls, v: str | None) -> str | None:
        if v is not None and v != "chatml" and "{{" not in v and "{%" not in v:
            raise ValueError(
                f"chat_template {v[:40]!r} is neither `chatml` nor a jinja template ({{% ... %}} / {{{{ ... }}}})"
            )
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if not self.tasks and not self.task_sets:
            raise ValueError("the job has no task: list at least one entry under tasks: or task_sets:")
        sets = [s.name for s in self.task_sets]
        if len(set(sets)) < len(sets):
            raise ValueError(
                f"task set names must be unique; repeated: {sorted({n for n in sets if sets.count(n) > 1})}"
            )
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {dup}")
        self.eval.check([*self.tasks, *self.task_sets, *([self.recycle.new_task] if self.recycle.new_task else [])])
        if self.search.enabled:
            self.search.check_metric(self.eval, [*self.tasks, *self.task_sets])
        if self.recycle.new_task is not None and self.recycle.new_task.name in names:
            raise ValueError(f"recycle.new_task {self.recycle.new_task.name!r} must be held out of the flock's tasks")
        picks = self.search.enabled and self.search.pick is not None  # recycle then uses the picked trial
        if self.recycle.enabled and not self.flock.enabled and not self.recycle.sources and not picks:
            raise ValueError("recycle needs adapters: enable the flock, list recycle.sources, or set search.pick")
        if self.gates.enabled and not self.flock.enabled:
            raise ValueError("gates train in the flock stage: set flock.enabled: true, or gates.enabled: false")
        if self.gates.enabled and self.base.quantized:
            raise ValueError(
                "gates on a quantised base (base.bits/base.bit_budget) are not supported in the flock yet: the export "
                "slices dense weights; drop one of them (the search stage combines both per trial)"
            )
        unknown = sorted(set(self.lora.ranks) - set(names))
        if unknown and not self.task_sets:  # a set's task names are known only once its table is read
            raise ValueError(f"lora.ranks names unknown tasks {unknown}; tasks are {names}")
        if self.base.quantized:
            self._check_lq_rank()
            if self.recycle.enabled and self.recycle.new_task is not None:
                raise ValueError(
                    "recycle.new_task is adapted on the unquantised base, but base.bits/base.bit_budget train the "
                    "flock's adapters on a quantised one (they hold its LQ low-rank part): not supported together yet; "
                    "drop recycle.new_task (the subspace is still built) or base.bits/base.bit_budget"
                )
        return self

    def _check_lq_rank(self) -> None:
        """The LQ low-rank part starts the shared Theta: it must fit every task's rank and scale."""
        r = self.lq_rank()
        if r == 0:
            return
        ranks = {self.rank_of(t.name) for t in self.tasks}
        if len(ranks) > 1:
            raise ValueError(
                f"base.quant.lq_rank {r} needs one LoRA rank for every task (lora.ranks gives {sorted(ranks)}): "
                "set base.quant.lq_rank: 0 (plain quantisation) or drop lora.ranks"
            )
        if r > min(ranks):
            raise ValueError(f"base.quant.lq_rank {r} exceeds lora.rank {min(ranks)}: use at most {min(ranks)}")

    def lq_rank(self) -> int:
        """Rank of the LQ low-rank part (0 when the base is not quantised)."""
        if not self.base.quantized:
            return 0
        q = self.base.quant.lq_rank
        return self.lora.rank if q is None else q

    def rank_of(self, task: str) -> int:
        return self.lora.ranks.get(task, self.lora.rank)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message``."""
    lines = [f"{source}: {err.error_count()} problem(s) in the job spec:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `loraflock schema` lists the fields)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_job(data: Any, source: str = "<spec>") -> JobSpec:
    """Validate a dict (parsed YAML) into a :class:`JobSpec`, or raise :class:`SpecError`."""
    if data is None:
        raise SpecError(f"{source}: the job spec is empty; see examples/tiny.yaml for a minimal job")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job spec must be a YAML mapping (key: value), got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job YAML file (safe YAML only), or raise :class:`SpecError`."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such job file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not UTF-8 text; save the job spec as UTF-8 YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{p}: malformed YAML{where}: {problem}") from None
    return parse_job(data, str(p))

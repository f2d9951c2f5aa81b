"""The typed hand-offs between the stages: what workers write, drivers merge and the report reads.

Each stage passes plain JSON-able dicts (they go through Ray checkpoints and ``json``), so
the types are ``TypedDict``: the dicts on disk are exactly what they were, and a reader or
writer that misspells a key is caught by a type checker instead of by a ``KeyError`` at the
end of a long job. Keys are task *names* here (the Ray-free loop's
:class:`models.train.results.MethodResult` keys by slot; the worker maps them).

Flow::

    flock worker ----- WorkerResults (results/rank<k>.json in its checkpoint)
      \\- run_pesc ---- PescPart
    run_flock -------- FlockResults (merged; merge_pesc gives PescResult)
    report.writer ---- reads FlockResults
    search trial ----- TrialMetrics (tune.report + trial.json in its checkpoint)
"""

from __future__ import annotations

from typing_extensions import NotRequired, TypedDict

__all__ = [
    "GateResults",
    "MethodRecord",
    "PescPart",
    "PescResult",
    "WorkerResults",
    "FlockResults",
    "TrialMetrics",
    "Curve",
    "EvalCurve",
]

Curve = list[tuple[int, float]]  # (step, weighted train NLL); JSON turns the tuples into lists
EvalCurve = list[tuple[int, dict[str, float]]]  # (step, {task: eval NLL}) every train.eval_every steps


class GateResults(TypedDict):
    """FineGates' sparsity on one worker (``models.gates.layer.sparsity_report`` plus tasks).

    Keys:
        removed_fraction: removed / total over every gated base weight.
        layers: gated layer -> ``{"rows_kept", "cols_kept", "removed_fraction"}``.
        tasks: task -> removed fraction of its gates (task scope differs per task).
    """

    removed_fraction: float
    layers: dict[str, dict]
    tasks: dict[str, float]


class MethodRecord(TypedDict):
    """One method of the flock (hierarchical, a baseline, a tau-sweep point).

    Keys:
        kind: hierarchical | independent | unified.
        tau: the method's tau (``"inf"`` for unified, ``"infer"`` when inferred).
        eval_nll: task -> mean eval NLL (failed tasks absent).
        failed: task -> why it was stopped.
        curve / eval_curve: training NLL per ``log_every``; eval NLL per ``train.eval_every``.
        seconds / tokens_per_s: training time (merged: the slowest worker's) and speed.
        tau_inferred / tau_history: the prior's tau (methods with a prior).
        gates: FineGates' sparsity (gated jobs).
        metrics: task -> {metric: value} (tasks judged beyond ``ppl``: ``orchestrator.task_metrics``).
    """

    kind: str
    tau: float | str
    eval_nll: dict[str, float]
    failed: dict[str, str]
    curve: Curve
    eval_curve: NotRequired[EvalCurve]
    seconds: float
    tokens_per_s: float
    tau_inferred: NotRequired[dict[str, float] | None]
    metrics: NotRequired[dict[str, dict[str, float]]]
    tau_history: NotRequired[list[dict] | None]
    gates: NotRequired[GateResults]


class PescResult(TypedDict):
    """PESC's results (merged over workers: the report's ``pesc`` block comes from these).

    Keys:
        eval_nll: task -> mean eval NLL.
        expert_load: MoE block -> each expert's share of the top-k assignments.
        task_expert_load: task -> block -> shares.
        trainable_params: experts + routers + attention LoRA.
        seconds: training + evaluation (merged: the slowest worker's).
        curve: the training NLL (rank 0's).
    """

    eval_nll: dict[str, float]
    expert_load: dict[str, list[float]]
    task_expert_load: dict[str, dict[str, list[float]]]
    trainable_params: int
    seconds: float
    curve: Curve
    metrics: NotRequired[dict[str, dict[str, float]]]


class PescPart(PescResult):
    """One worker's PESC results: plus its eval rows, which weigh its expert load in the merge."""

    eval_rows: int


class WorkerResults(TypedDict):
    """What one flock worker checkpoints as ``results/rank<k>.json`` (resumable: methods done).

    Keys:
        base_eval_nll: task -> the untuned base's eval NLL.
        methods: method name -> its record (only the finished ones).
        owned: this worker's tasks.
        quant: the quantised base's summary (rank 0, quantised jobs).
        pesc: this worker's PESC part (when the pesc stage ran).
        timing: this worker's phases in this invocation: ``started_at`` (wall clock), seconds
            ``startup_s`` (base + adapters), ``prefix_s``, ``base_eval_s``, ``steps_s`` (step
            loops), ``eval_s`` (final and periodic evaluations, metrics), ``save_s`` (adapters,
            prior), and ``peak_rss_mb``.
    """

    base_eval_nll: dict[str, float]
    base_metrics: NotRequired[dict[str, dict[str, float]]]
    methods: dict[str, MethodRecord]
    owned: list[str]
    quant: NotRequired[dict]
    pesc: NotRequired[PescPart]
    timing: NotRequired[dict[str, float]]


class FlockResults(TypedDict):
    """The flock stage's merged result (:func:`orchestrator.flock.driver.run_flock`): what the report reads.

    Keys:
        base_eval_nll / methods / quant: every worker's, merged by task.
        pesc: merged PESC results (when enabled).
        assignment: ``worker<i>`` -> its tasks.
        sizes: task -> training sequences.
        workers: ``worker<i>`` -> its ``timing`` (see :class:`WorkerResults`) plus ``launch_s``:
            seconds from the stage's start until the worker began (Ray Train's start-up).
    """

    base_eval_nll: dict[str, float]
    base_metrics: NotRequired[dict[str, dict[str, float]]]
    methods: dict[str, MethodRecord]
    quant: NotRequired[dict]
    pesc: NotRequired[PescResult]
    assignment: dict[str, list[str]]
    sizes: dict[str, int]
    workers: NotRequired[dict[str, dict[str, float]]]


class TrialMetrics(TypedDict):
    """What a search trial reports to Tune (and writes as ``trial.json`` beside its checkpoint).

    Keys:
        step: steps trained; final: whether this is the last report (whole eval set).
        eval: ``"full"`` or ``"subset"`` (the first ``search.eval_subset`` rows per task).
        macro_ppl: mean of per-task perplexities.
        sparsity / bits: removed fraction of gated weights, base bits.
        model_bytes, base_bytes, compressed_bytes, adapter_bytes, mask_bytes: deployed size
            (``orchestrator.search.sizes.deployed_bytes``).
        target_bytes / rung_bytes: the size at the target sparsity and the scheduler's size
            (ParetoASHA records a result only when ``rung_bytes`` is present); a packed trial is
            ungated, so both are its ``model_bytes``, as the unpacked trial reports them.
        quant_rel_error: LQ reconstruction error (quantised bases), else None.
        seconds: since the trial started.
        macro_<metric> / judge_s: with a task ``search.metric`` (``orchestrator.search.judge``):
            its mean over the judged tasks on their seeded ``search.metric_rows`` rows, and
            the seconds judging took.
    """

    step: int
    macro_ppl: float
    final: bool
    eval: str
    sparsity: float
    bits: int
    model_bytes: int
    base_bytes: int
    compressed_bytes: int
    adapter_bytes: int
    mask_bytes: int
    target_bytes: NotRequired[int]
    rung_bytes: NotRequired[int]
    quant_rel_error: float | None
    seconds: float
    macro_exact_match: NotRequired[float]
    macro_accuracy: NotRequired[float]
    macro_choice_accuracy: NotRequired[float]
    macro_rouge_l: NotRequired[float]
    judge_s: NotRequired[float]

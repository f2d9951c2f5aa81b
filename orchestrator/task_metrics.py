"""Each task's own metrics (``eval:`` / per-task ``metrics:``) for the flock, its baselines and PESC.

The driver prepares, once, what judging needs (:func:`metric_plan`): every task's resolved
:class:`tasks.metric_spec.MetricSettings` and its eval prompts, references and label set
(:func:`tasks.evaluate.eval_examples`), for the tasks that ask for more than ``ppl``. The plan
travels to the workers with the token ids; each worker judges its own tasks after every method
and once on the untuned base (:func:`judge`), all its tasks mixed in every generation batch.
Perplexity stays with the training loop's evaluation.
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec import JobSpec

__all__ = ["job_tokenizer", "metric_plan", "judge"]


def job_tokenizer(spec: JobSpec):
    """The job's tokenizer (``base.tokenizer``, else the base's own; GGUF conversions are cached)."""
    from tasks.tokenizer import load_tokenizer

    gguf = spec.base.gguf_file if spec.base.tokenizer is None else None
    return load_tokenizer(spec.base.tokenizer or spec.base.name, gguf)


def _settings_of(spec: JobSpec, data) -> Any:
    """A built task's settings: its task set's (``stats['task_set']['set']``), its own entry's, or the job's."""
    sets = {s.name: s for s in spec.task_sets}
    origin = (data.stats or {}).get("task_set") or {}
    if origin.get("set") in sets:
        return spec.eval.for_task(sets[origin["set"]])
    tasks = {t.name: t for t in spec.tasks}
    if data.name in tasks:
        return spec.eval.for_task(tasks[data.name])
    from tasks.spec import TaskOptions

    return spec.eval.for_task(TaskOptions())  # no entry of its own (a new task): the job's defaults


def metric_plan(spec: JobSpec, data: list, tokenizer=None) -> dict[str, dict]:
    """``{task: {"settings": dict, "examples": EvalExamples}}`` for the tasks judged beyond ``ppl``.

    Empty when no task asks for another metric, so jobs that judge by perplexity pay nothing.
    """
    from tasks.evaluate import eval_examples

    plan: dict[str, dict] = {}
    for d in data:
        settings = _settings_of(spec, d)
        if set(settings.metrics) <= {"ppl"}:
            continue
        tokenizer = tokenizer or job_tokenizer(spec)
        plan[d.name] = {"settings": settings.model_dump(mode="json"),
                        "examples": eval_examples(d, tokenizer, settings, spec.eval.max_examples)}
    return plan


def judge(model, plan: dict[str, dict], slot_of: dict[str, int], tokenizer, batch_size: int) -> dict[str, dict]:
    """``{task: {metric: value}}`` of ``model`` on the planned tasks in ``slot_of`` (a worker's own)."""
    from tasks.evaluate import evaluate_metrics
    from tasks.metric_spec import MetricSettings

    mine = {t: p for t, p in plan.items() if t in slot_of}
    if not mine:
        return {}
    was_training = model.training
    model.eval()
    try:
        return evaluate_metrics(
            model, {t: p["examples"] for t, p in mine.items()},
            {t: MetricSettings.model_validate(p["settings"]) for t, p in mine.items()},
            tokenizer, slot_of={t: slot_of[t] for t in mine}, batch_size=batch_size,
        )
    finally:
        model.train(was_training)

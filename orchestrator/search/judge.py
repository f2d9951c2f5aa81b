"""A search trial's task metric (``search.metric``): judged at every report on a fixed, seeded subset of eval rows.

Perplexity comes free with the training loop's evaluation; a task metric needs greedy
generations (``exact_match``, ``accuracy``, ``rouge_l``) or label scoring
(``choice_accuracy``), which costs far more per row. So a trial judges only:

* the tasks judged by ``search.metric`` (their ``eval:`` / per-task ``metrics``), and only that
  metric (not the task's other ones);
* ``search.metric_rows`` eval rows per task, chosen once on the driver by a generator seeded
  with ``(search.seed, task name)``: every report of every trial sees the same rows, so the
  rungs of successive halving and the front compare like with like, and a task's rows do
  not change when other tasks are added;
* all tasks mixed in each generation / scoring batch, each row through its task's slot
  (:func:`orchestrator.task_metrics.judge`, the code that judges the flock's methods).

The trial reports ``macro_<metric>``, the mean over the judged tasks (each task the mean over
its rows), and ``judge_s``, the seconds judging took.

A packed trial (``search.packing``) is judged the same way on its pack host: the host got the
plan once with the search payload, and judges a lease through that lease's slot group
(``slot_offset``: where the group starts among the host model's slots), so the same rows are
judged as in the unpacked trial; trials of one host that report together are judged in one
mixed pass (:func:`judge_trials`: every trial's rows in the same batches).

Example:
    >>> plan = trial_judge_plan(spec, spec.search, data)   # on the driver, into the payload
    >>> judge_trial(model, plan, tokenizer)                  # in the trial, at each report
    {'macro_exact_match': 0.4375, 'judge_s': 3.1}
    >>> judge_trial(host_model, plan, tokenizer, slot_offset=lease.slots.start)   # a packed trial, on its host
    >>> judge_trials(host_model, plan, tokenizer, [0, 6, 12])   # three packed trials reporting together
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from orchestrator.spec import JobSpec
from orchestrator.specs.search import SearchSpec, objective
from orchestrator.task_metrics import judge, metric_plan

__all__ = ["trial_judge_plan", "judge_trial", "judge_trials"]


def trial_judge_plan(spec: JobSpec, search: SearchSpec, data: list, tokenizer=None) -> dict | None:
    """What every trial judges: ``{"metric", "plan", "slots", "batch_size"}``; ``None`` for ``ppl``.

    ``plan`` is :func:`orchestrator.task_metrics.metric_plan`'s, restricted to the tasks judged
    by the metric, to that metric, and to each task's seeded ``metric_rows`` rows; ``slots``
    maps each judged task to its slot in the trial (its index in ``data``).

    Raises:
        ValueError: no task is judged by the metric (the spec's validation says so first).
    """
    if search.metric == "ppl":
        return None
    from tasks.metric_spec import MetricSettings

    slot = {d.name: i for i, d in enumerate(data)}
    plan = {}
    for name, p in metric_plan(spec, data, tokenizer).items():
        settings = MetricSettings.model_validate(p["settings"])
        if search.metric not in settings.metrics:
            continue
        ex = p["examples"]
        rows = sorted(random.Random(f"{search.seed}:{name}").sample(range(len(ex)), min(search.metric_rows, len(ex))))
        plan[name] = {"settings": settings.model_copy(update={"metrics": [search.metric]}).model_dump(mode="json"),
                      "examples": ex.subset(rows)}
    if not plan:
        raise ValueError(f"search.metric {search.metric!r}: no task of the search is judged by it")
    return {"metric": search.metric, "plan": plan, "slots": {t: slot[t] for t in plan},
            "batch_size": spec.eval.batch_size}


def judge_trial(model, plan: dict, tokenizer, slot_offset: int = 0) -> dict[str, float]:
    """``{"macro_<metric>": mean over the judged tasks, "judge_s": seconds}`` of the trial's model.

    ``slot_offset``: the first of the trial's slots in ``model`` (0 for an unpacked trial, whose
    model holds only its own; a packed trial's lease starts its group of slots further on).
    """
    return judge_trials(model, plan, tokenizer, [slot_offset])[0]


def judge_trials(model, plan: dict, tokenizer, slot_offsets: Sequence[int]) -> list[dict[str, float]]:
    """:func:`judge_trial` of several trials whose slot groups share ``model`` (packed trials), in one pass.

    Every trial's rows go into the same generation / scoring batches (rows of similar length
    together, whichever trial they belong to), each row through its own trial's slot of its
    task, so a host whose trials report together generates once instead of once per trial.
    Each trial's ``judge_s`` is the seconds of that shared pass (what the trial waited).
    """
    t0 = time.perf_counter()
    tasks = list(plan["plan"])
    keyed, slots = {}, {}
    for i, offset in enumerate(slot_offsets):
        for t in tasks:
            keyed[f"{i}/{t}"] = plan["plan"][t]
            slots[f"{i}/{t}"] = int(offset) + int(plan["slots"][t])
    per_task = judge(model, keyed, slots, tokenizer, int(plan["batch_size"]))
    seconds = time.perf_counter() - t0
    key, _ = objective(plan["metric"])
    out = []
    for i in range(len(slot_offsets)):
        values = [per_task[f"{i}/{t}"][plan["metric"]] for t in tasks]
        out.append({key: float(sum(values) / len(values)), "judge_s": seconds})
    return out

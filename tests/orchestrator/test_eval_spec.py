"""The job's ``eval:`` section and per-task metric overrides: resolution and the refusals of bad input."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import parse_job

BASE = {"base": {"name": "smollm2-135m"}}
TEXT = {"name": "json", "source": {"kind": "builtin", "suite": "stdlib-code", "package": "json"}}
SUB = {"name": "sub", "source": {"kind": "builtin", "suite": "stdlib-instruct", "subset": "submodule"}}
SIG_SET = {"name": "signature", "task_field": "package",
           "source": {"kind": "builtin", "suite": "stdlib-instruct", "subset": "signature"}}


def test_task_and_set_overrides_resolve_over_the_job_default():
    job = parse_job(dict(
        BASE, tasks=[TEXT, dict(SUB, metrics=["ppl", "choice_accuracy"], labels=["decoder", "encoder"])],
        task_sets=[dict(SIG_SET, max_new_tokens=40, stop=["\n"])],
        eval={"metrics": ["ppl"], "max_new_tokens": 16},
    ))
    text, sub = (job.eval.for_task(t) for t in job.tasks)
    sig = job.eval.for_task(job.task_sets[0])
    assert (text.metrics, text.max_new_tokens, text.stop) == (["ppl"], 16, [])
    assert (sub.metrics, sub.labels) == (["ppl", "choice_accuracy"], ["decoder", "encoder"])
    assert (sig.metrics, sig.max_new_tokens, sig.stop) == (["ppl"], 40, ["\n"])
    assert parse_job(dict(BASE, tasks=[TEXT])).eval.metrics == ["ppl"]  # today's behaviour by default


@pytest.mark.parametrize("job, needles", [
    (dict(BASE, tasks=[TEXT], eval={"metrics": ["ppl", "exact_match"]}), ["task 'json'", "`text` task", "[ppl]"]),
    (dict(BASE, tasks=[dict(TEXT, metrics=["rouge_l"])]), ["task 'json'", "rouge_l", "[ppl]"]),
    (dict(BASE, task_sets=[{"name": "code", "task_field": "package",
                            "source": {"kind": "builtin", "suite": "stdlib-code", "package": "json"}}],
          eval={"metrics": ["accuracy"]}), ["task set 'code'", "[ppl]"]),
    (dict(BASE, tasks=[dict(SUB, metrics=["choice_accuracy"], labels=["decoder"])]), ["tasks.0.labels", "at least 2"]),
    (dict(BASE, tasks=[dict(SUB, metrics=["choice_accuracy"], labels=["a", "a"])]), ["at least 2"]),
    (dict(BASE, tasks=[dict(SUB, metrics=["choice_accuracy"], labels=[f"l{i}" for i in range(65)])]),
     ["65 labels", "at most 64"]),
    (dict(BASE, tasks=[dict(SUB, labels=["decoder", "encoder"])]), ["task 'sub'", "choice_accuracy"]),
    (dict(BASE, tasks=[SUB], eval={"metrics": ["bleu"]}), ["eval.metrics.0"]),
])
def test_bad_metric_settings_are_refused_with_the_fix(job, needles):
    with pytest.raises(SpecError) as err:
        parse_job(job)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_sixty_four_labels_are_accepted():
    job = parse_job(dict(BASE, tasks=[dict(SUB, metrics=["choice_accuracy"], labels=[f"l{i}" for i in range(64)])]))
    assert len(job.eval.for_task(job.tasks[0]).labels) == 64

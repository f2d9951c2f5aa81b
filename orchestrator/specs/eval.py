"""The ``eval:`` section of a job: the metrics every task is judged by, unless it says otherwise.

Each task or task set may override ``metrics``, ``max_new_tokens`` and ``stop`` and give
``choice_accuracy``'s ``labels`` (:class:`tasks.spec.TaskOptions`); :meth:`EvalSpec.for_task`
resolves them to one :class:`tasks.metric_spec.MetricSettings`. Metrics are defined in
:mod:`tasks.metrics`.

Example (YAML, inside a job)::

    eval:
      metrics: [ppl, exact_match, rouge_l]
      max_new_tokens: 48
      stop: ["\\n\\n"]
    task_sets:
      - name: submodule
        source: {kind: builtin, suite: stdlib-instruct, subset: submodule}
        task_field: package
        metrics: [ppl, accuracy, choice_accuracy]   # short labels: no rouge
        max_new_tokens: 8
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field, field_validator

from tasks.metric_spec import Metric, MetricSettings
from tasks.spec import TaskOptions, TaskSetSpec, TaskSpec, example_format_of
from tasks.strict import Strict

__all__ = ["EvalSpec"]


class EvalSpec(Strict):
    """Job-wide metric defaults.

    Args:
        metrics: what every task is judged by (default ``[ppl]``, today's perplexity only).
        max_new_tokens: generation length cap for the generation metrics.
        stop: strings that end a generation (EOS and the chat end-of-turn always do).
        batch_size: rows per generation / label-scoring batch (tasks mixed in one batch).
        max_examples: score at most this many eval examples per task (the first ones);
            ``None``: all of them.
    """

    metrics: list[Metric] = Field(default_factory=lambda: ["ppl"], min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    stop: list[str] = Field(default_factory=list)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1)

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    def for_task(self, opts: TaskOptions) -> MetricSettings:
        """The settings of one task (a :class:`TaskSpec`) or of every task of a :class:`TaskSetSpec`."""
        return opts.metric_settings(self.metrics, self.max_new_tokens, self.stop)

    def check(self, entries: Iterable[TaskSpec | TaskSetSpec]) -> None:
        """Raise ValueError for the first task or set whose metrics cannot judge its examples."""
        for e in entries:
            what = f"task set {e.name!r}" if isinstance(e, TaskSetSpec) else f"task {e.name!r}"
            self.for_task(e).check_fits(what, example_format_of(e.source))

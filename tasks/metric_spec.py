"""How a task is judged: the metric names, label-set limits and :class:`MetricSettings`.

Kept apart from :mod:`tasks.spec` (where the data comes from) because the metrics are a job's
``eval:`` section with per-task overrides; :mod:`tasks.metrics` computes each metric and
:mod:`tasks.evaluate` runs them on a model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.strict import Strict

__all__ = ["METRICS", "GENERATION_METRICS", "MAX_LABELS", "Metric", "MetricSettings", "check_labels"]

# how a task is judged (tasks/metrics.py defines each); ``ppl`` is the training loop's eval perplexity
METRICS: tuple[str, ...] = ("ppl", "exact_match", "accuracy", "choice_accuracy", "rouge_l")
GENERATION_METRICS: tuple[str, ...] = ("exact_match", "accuracy", "rouge_l")  # on greedy generations
MAX_LABELS = 64  # choice_accuracy scores every label on every eval row
Metric = Literal["ppl", "exact_match", "accuracy", "choice_accuracy", "rouge_l"]


def check_labels(labels: list[str]) -> list[str]:
    """A ``choice_accuracy`` label set: 2 to :data:`MAX_LABELS` distinct, non-empty strings."""
    if len(set(labels)) < 2:
        raise ValueError(f"labels {labels[:2]} give fewer than 2 distinct choices: choice_accuracy needs at least 2")
    if len(labels) > MAX_LABELS:
        raise ValueError(
            f"{len(labels)} labels: choice_accuracy scores every label on every eval row, so at most {MAX_LABELS}; "
            "judge a task with more classes by exact_match (greedy generation) instead"
        )
    if any(not s.strip() for s in labels):
        raise ValueError("labels must not be empty strings")
    return labels


class MetricSettings(Strict):
    """How one task is judged: the job's ``eval:`` defaults with the task's overrides applied.

    Args:
        metrics: ``ppl`` (eval perplexity over completion tokens), ``exact_match`` and
            ``accuracy`` (greedy generations vs the reference completion, normalised),
            ``choice_accuracy`` (the label the model finds most likely, no generation) and
            ``rouge_l`` (ROUGE-L F1 of the generation); see :mod:`tasks.metrics`.
        max_new_tokens: generation length cap.
        stop: strings that end a generation (cut before them); EOS always ends it.
        labels: ``choice_accuracy``'s labels; ``None``: the distinct training completions.
    """

    metrics: list[Metric] = Field(default_factory=lambda: ["ppl"], min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    stop: list[str] = Field(default_factory=list)
    labels: list[str] | None = None

    @property
    def generates(self) -> bool:
        """Whether a metric needs greedy generations."""
        return any(m in GENERATION_METRICS for m in self.metrics)

    def check_fits(self, what: str, example_format: str) -> None:
        """Raise ValueError naming ``what`` (the task) when a metric cannot apply to its examples."""
        needs_completion = [m for m in self.metrics if m != "ppl"]
        if example_format == "text" and needs_completion:
            raise ValueError(
                f"{what} is a `text` task (no completion to compare with), so {needs_completion} cannot judge it: "
                "use metrics: [ppl] for it, or give it prompt/completion examples"
            )
        if self.labels is not None and "choice_accuracy" not in self.metrics:
            raise ValueError(f"{what} gives labels but no choice_accuracy metric: add choice_accuracy or drop labels")

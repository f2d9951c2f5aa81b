"""Judge a trained model on every task's metrics: one generation pass and one label-scoring pass for all tasks.

:func:`eval_examples` turns a task's eval rows (:class:`tasks.TaskData`) into prompts and
reference completions: the prompt is everything before the row's final completion
(``eval_prompt_lens``), the reference the completion's tokens up to the row's last scored
one (EOS or the chat end-of-turn included), decoded without special tokens. For
``choice_accuracy`` it also builds the label set (:func:`label_choices`).

:func:`evaluate_metrics` then generates greedily for every task that has a generation metric,
all tasks mixed in the same batches, each row through its task's adapter slot
(:func:`models.generate.generate`), and scores every label set likewise
(:func:`models.generate.score_choices`); the string metrics are in :mod:`tasks.metrics`.
``ppl`` is not computed here: the training loop's evaluation already reports it.

Example:
    >>> ex = {d.name: eval_examples(d, tok, settings[d.name]) for d in data}
    >>> evaluate_metrics(model, ex, settings, tok, slot_of={d.name: i for i, d in enumerate(data)})
    {'sub-json': {'accuracy': 0.75, 'choice_accuracy': 0.83}, 'sig-json': {'exact_match': 0.25, 'rouge_l': 0.71}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks import metrics as string_metrics
from tasks.errors import TaskDataError
from tasks.metric_spec import MAX_LABELS, MetricSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from tasks.task_data import TaskData

__all__ = ["Choices", "EvalExamples", "eval_examples", "label_choices", "evaluate_metrics"]


@dataclass
class Choices:
    """A task's label set for ``choice_accuracy``: each label's text and its token ids (terminator included)."""

    texts: list[str]
    ids: list[list[int]]


@dataclass
class EvalExamples:
    """One task's eval examples, ready to prompt a model with.

    Attributes:
        prompts: token ids before each final completion.
        references: each reference completion, decoded without special tokens.
        stop_ids: token ids that end a completion (EOS and the special tokens closing the
            training completions, e.g. ``<|im_end|>``).
        pad_id: the tokenizer's pad (or EOS) id.
        choices: the label set, when ``choice_accuracy`` is asked for.
    """

    prompts: list[list[int]]
    references: list[str]
    stop_ids: list[int]
    pad_id: int
    choices: Choices | None = None
    targets: list[list[int]] = field(default_factory=list)  # reference token ids

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: list[int]) -> EvalExamples:
        """These examples restricted to ``rows`` (indices, in the given order); labels and stop ids kept."""
        return EvalExamples(
            prompts=[self.prompts[i] for i in rows], references=[self.references[i] for i in rows],
            stop_ids=self.stop_ids, pad_id=self.pad_id, choices=self.choices,
            targets=[self.targets[i] for i in rows] if self.targets else [],
        )


def _completions(ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row: the completion runs from its start to the last scored token."""
    out = []
    for row, m, s in zip(ids.tolist(), mask.tolist(), starts.tolist()):
        end = max((j for j, on in enumerate(m) if on), default=s - 1) + 1
        out.append((row[:s], row[s:end]))
    return out


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return {int(t) for t in tokenizer.all_special_ids}


def _terminator(target: list[int], special: set[int]) -> list[int]:
    """The tokens that close a completion: from its first special token on (``[EOS]``, ``[<|im_end|>, \\n]``)."""
    return next((target[j:] for j, t in enumerate(target) if t in special), [])


def label_choices(
    data: TaskData, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None
) -> Choices:
    """The label set of a task: the given labels, or the distinct training completions.

    Given labels are tokenised alone and closed like the training completions (EOS, or the
    chat template's end of turn), so a label that is a prefix of another (``json`` /
    ``json.decoder``) does not win by being shorter. Training completions keep their exact
    token ids; two that normalise alike (:func:`tasks.metrics.normalize`) are one label.

    Raises:
        TaskDataError: the task has no completions (``text``), or fewer than 2 or more than
            64 distinct training completions (the message says to give ``labels``).
    """
    if data.train_prompt_lens is None or data.train_mask is None:
        raise TaskDataError(f"task {data.name!r} has no completions (a `text` task): choice_accuracy cannot judge it")
    special = _special_ids(tokenizer)
    targets = [c for _, c in _completions(data.train_ids, data.train_mask, data.train_prompt_lens)]
    if labels is not None:
        end = next((_terminator(t, special) for t in targets if _terminator(t, special)), [tokenizer.eos_token_id])
        ids = [[*tokenizer(label, add_special_tokens=False)["input_ids"], *end] for label in labels]
        return Choices(list(labels), ids)
    seen: dict[str, list[int]] = {}
    for t in targets:
        text = tokenizer.decode(t, skip_special_tokens=True)
        seen.setdefault(string_metrics.normalize(text), t)
        if len(seen) > MAX_LABELS:
            raise TaskDataError(
                f"task {data.name!r}: choice_accuracy takes its labels from the training completions, but they "
                f"hold more than {MAX_LABELS} distinct ones: give the task `labels:` (at most {MAX_LABELS}), or "
                "judge it by exact_match"
            )
    if len(seen) < 2:
        raise TaskDataError(
            f"task {data.name!r}: its training completions hold {len(seen)} distinct label(s), choice_accuracy needs "
            "at least 2: give the task `labels:`"
        )
    return Choices([tokenizer.decode(t, skip_special_tokens=True).strip() for t in seen.values()], list(seen.values()))


def eval_examples(
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    settings: MetricSettings | None = None,
    max_examples: int | None = None,
) -> EvalExamples:
    """Prompts and references of a task's eval rows (the first ``max_examples``), plus its labels when asked.

    Raises:
        TaskDataError: a ``text`` task (nothing to prompt with); a label set that does not fit.
    """
    if data.eval_prompt_lens is None or data.eval_mask is None:
        raise TaskDataError(f"task {data.name!r} is a `text` task: it has no prompts to generate from; judge it by ppl")
    n = len(data.eval_prompt_lens) if max_examples is None else min(max_examples, len(data.eval_prompt_lens))
    pairs = _completions(data.eval_ids[:n], data.eval_mask[:n], data.eval_prompt_lens[:n])
    special = _special_ids(tokenizer)
    eos = int(tokenizer.eos_token_id)
    stop = sorted({eos, *(t for _, c in pairs for t in c if t in special)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    choices = None
    if settings is not None and "choice_accuracy" in settings.metrics:
        choices = label_choices(data, tokenizer, settings.labels)
    return EvalExamples(
        prompts=[p for p, _ in pairs],
        references=[tokenizer.decode(c, skip_special_tokens=True) for _, c in pairs],
        stop_ids=stop,
        pad_id=int(pad),
        choices=choices,
        targets=[c for _, c in pairs],
    )


def evaluate_metrics(
    model: torch.nn.Module,
    examples: Mapping[str, EvalExamples],
    settings: Mapping[str, MetricSettings],
    tokenizer: PreTrainedTokenizerBase,
    slot_of: Mapping[str, int] | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Every task's metrics (``ppl`` aside) for one model, all tasks mixed in each batch.

    Works for any model whose adapters follow :func:`models.lora.task_ids` (the flock, its
    baselines, PESC, recycled coefficient adapters; dense, quantised or pruned base) and for
    a plain base (the untuned reference: every slot is the base).

    Args:
        model: a ``transformers`` causal LM.
        examples: task -> :func:`eval_examples` of it.
        settings: task -> its :class:`tasks.metric_spec.MetricSettings` (``EvalSpec.for_task``).
        tokenizer: the tokenizer the rows were made with.
        slot_of: task -> adapter slot (the unified baseline: every task -> 0); default: the
            order of ``examples``.
        batch_size: rows per generation / scoring batch.

    Returns:
        ``{task: {metric: value}}``, each value the mean over the task's examples, in [0, 1].
    """
    from models.generate import generate, score_choices

    slot_of = dict(slot_of) if slot_of is not None else {t: i for i, t in enumerate(examples)}
    out: dict[str, dict[str, float]] = {t: {} for t in examples}
    # One generation pass per distinct (max_new_tokens, stop): usually one for the whole job.
    groups: dict[tuple, list[str]] = {}
    for t in examples:
        s = settings[t]
        if s.generates:
            groups.setdefault((s.max_new_tokens, tuple(s.stop)), []).append(t)
    for (max_new, stop), tasks in groups.items():
        rows = [(t, j) for t in tasks for j in range(len(examples[t]))]
        gen = generate(
            model, [examples[t].prompts[j] for t, j in rows], [slot_of[t] for t, _ in rows],
            pad_id=examples[tasks[0]].pad_id, stop_ids=sorted({i for t in tasks for i in examples[t].stop_ids}),
            max_new_tokens=max_new, stop=stop, tokenizer=tokenizer, batch_size=batch_size,
        )
        texts: dict[str, list[str]] = {t: [] for t in tasks}
        for (t, _), text in zip(rows, gen.texts):
            texts[t].append(text)
        for t in tasks:
            for m in settings[t].metrics:
                if m in ("exact_match", "accuracy", "rouge_l"):
                    out[t][m] = getattr(string_metrics, m)(texts[t], examples[t].references)
    scored = [t for t in examples if "choice_accuracy" in settings[t].metrics]
    missing = [t for t in scored if examples[t].choices is None]
    if missing:
        raise ValueError(f"tasks {missing} ask for choice_accuracy but their eval_examples hold no labels: "
                         "build them with eval_examples(data, tokenizer, settings)")
    if scored:
        rows = [(t, j) for t in scored for j in range(len(examples[t]))]
        scores = score_choices(
            model, [examples[t].prompts[j] for t, j in rows], [slot_of[t] for t, _ in rows],
            [examples[t].choices.ids for t, _ in rows], pad_id=examples[scored[0]].pad_id, batch_size=batch_size,
        )
        chosen: dict[str, list[str]] = {t: [] for t in scored}
        for (t, _), s in zip(rows, scores):
            chosen[t].append(examples[t].choices.texts[int(s.argmax())])
        for t in scored:
            out[t]["choice_accuracy"] = string_metrics.choice_accuracy(chosen[t], examples[t].references)
    return out

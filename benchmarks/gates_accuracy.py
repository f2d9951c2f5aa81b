"""The accuracy arm of ``gates_export.py`` (``--metric accuracy``): FineGates judged by task accuracy.

FineGates claims 20-40% of the base removed at little cost in *task accuracy*, which
perplexity on raw code does not measure. This arm trains and judges on the classification
subset of the builtin ``stdlib-instruct`` suite (``submodule``: a docstring -> the module
of its package it comes from; ``examples/instruct.yaml`` judges it by ``accuracy``), every
package pooled into one adapter (the gates are shared anyway):

* rows: ``prompt + completion + EOS``, the prompt cut on the left to fit ``seq`` tokens,
  padded on the right; only the completion and EOS are scored (as the product's
  ``prompt_completion`` rows);
* held out: every 5th example of each package (in the suite's order), so every package and
  most labels appear on both sides;
* accuracy: greedy generation from the prompt (:func:`models.generate.generate`, KV cache,
  EOS or a newline ends it), judged by :func:`tasks.metrics.accuracy` (first line, normalised):
  the same figure ``report.json`` gives for such a task.

Helpers only; ``gates_export.py`` runs the arms. Importable without ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.generate import generate
from tasks.builtin.instruct import INSTRUCTIONS, instruct_rows
from tasks.metrics import accuracy
from tasks.spec import STDLIB_PACKAGES

__all__ = ["Split", "classification_split", "example_rows", "prompt_ids", "model_accuracy"]

Split = tuple[list[tuple[str, str]], list[tuple[str, str]]]  # (train, eval) (prompt, completion) pairs


def classification_split(subset: str = "submodule", every: int = 5, packages: Sequence[str] | None = None) -> Split:
    """(train, eval) pairs of the suite's classification subset; every ``every``-th example of each package is eval.

    The prompt is the suite's own ``prompt_completion`` prompt (instruction, docstring, ``Answer: ``).
    """
    train, held = [], []
    for pkg in packages or STDLIB_PACKAGES:
        instruction = INSTRUCTIONS[subset].format(package=pkg)
        for i, (doc, answer) in enumerate(instruct_rows(subset, pkg)):
            (held if i % every == every - 1 else train).append((f"{instruction}\n\nDocstring: {doc}\nAnswer: ", answer))
    return train, held


def example_rows(
    tokenize: Callable[[str], list[int]], pairs: Sequence[tuple[str, str]], seq: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, scored): (N, seq) rows ``prompt + completion + EOS`` and their scored-token mask.

    A row longer than ``seq`` loses the left of its prompt; the completion and EOS are kept
    whole (``seq`` must leave room for them and one prompt token). ``scored[i, t]`` is True
    where token ``t`` is a completion token or the EOS (the targets the loss counts).
    """
    ids = torch.full((len(pairs), seq), int(pad_id), dtype=torch.long)
    scored = torch.zeros((len(pairs), seq), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(pairs):
        tail = [*tokenize(completion), int(eos_id)]
        if len(tail) >= seq:
            raise ValueError(f"a completion of {len(tail)} tokens does not fit --seq {seq}: raise --seq")
        head = tokenize(prompt)[-(seq - len(tail)):]
        row = head + tail
        ids[i, : len(row)] = torch.as_tensor(row)
        scored[i, len(head) : len(row)] = True
    return ids, scored


def prompt_ids(tokenize: Callable[[str], list[int]], pairs: Sequence[tuple[str, str]], max_len: int) -> list[list[int]]:
    """Each pair's prompt tokens, cut on the left to ``max_len`` (as the training rows cut them)."""
    return [tokenize(prompt)[-max_len:] for prompt, _ in pairs]


def model_accuracy(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    decode: Callable[[list[int]], str],
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int = 12,
    batch_size: int = 16,
) -> tuple[float, list[str]]:
    """(accuracy, answers): greedy answers through adapter slot 0 (a plain model ignores it), judged by
    :func:`tasks.metrics.accuracy` against ``references``."""
    gens = generate(model, prompts, 0, pad_id, stop_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = [decode(g) for g in gens.ids]
    return accuracy(answers, list(references)), answers

"""Task metrics on strings: a model's greedy generations (or chosen labels) vs the references.

Every comparison but ROUGE-L is on **normalised** text: surrounding whitespace stripped,
case folded (``str.casefold``), then trailing sentence punctuation (``. , ; : ! ?``, not
brackets or quotes) and the whitespace before it removed. Inner text is kept as is, so
``"def f(x):"`` and ``"def f(x)"`` match but ``"def f( x)"`` does not.

* ``exact_match``: the normalised generation equals the normalised reference.
* ``accuracy``: a classifier's answer is its first line: the normalised first non-empty
  line of the generation equals that of the reference (a model that answers, then goes on
  talking, is still right). For one-line references this is exact match on the first line.
* ``choice_accuracy``: the label the model finds most likely (sum of the label tokens'
  log-probabilities after the prompt; :func:`models.generate.score_choices`) equals the
  reference, normalised; a reference outside the label set counts as wrong.
* ``rouge_l``: ROUGE-L F1 (longest common subsequence of words) from Google's
  ``rouge-score`` package, its tokenizer (lower case, alphanumeric words) and no stemming.

Each returns the mean over examples, in [0, 1].

Example:
    >>> exact_match(["Decoder."], ["decoder"]), accuracy(["decoder\\nmore"], ["decoder"])
    (1.0, 1.0)
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

__all__ = ["normalize", "first_line", "exact_match", "accuracy", "rouge_l", "choice_accuracy"]

_TRAILING = ".,;:!?" + string.whitespace


def normalize(text: str) -> str:
    """Stripped, case-folded, without trailing punctuation (see the module docstring)."""
    return text.strip().casefold().rstrip(_TRAILING)


def first_line(text: str) -> str:
    """The first line holding more than whitespace ('' when there is none)."""
    return next((line for line in text.splitlines() if line.strip()), "")


def _mean(hits: Sequence[float]) -> float:
    if not hits:
        raise ValueError("no example to score: a metric needs at least one eval example")
    return float(sum(hits) / len(hits))


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize`."""
    _same_length(predictions, references)
    return _mean([float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)])


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions whose first line equals the reference's first line, normalised."""
    _same_length(predictions, references)
    return _mean(
        [float(normalize(first_line(p)) == normalize(first_line(r))) for p, r in zip(predictions, references)]
    )


def choice_accuracy(chosen: Sequence[str], references: Sequence[str]) -> float:
    """Share of chosen labels equal to the reference (normalised): exact match on labels."""
    return exact_match(chosen, references)


@functools.cache
def _rouge_l_scorer():
    """One scorer per process: building one logs "Using default tokenizer." each time."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (``rouge_score.rouge_scorer``, no stemming)."""
    _same_length(predictions, references)
    scorer = _rouge_l_scorer()
    return _mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])

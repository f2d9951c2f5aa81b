"""Perplexities of the mean NLLs that :func:`models.train.step.evaluate` returns.

Plain ``math``, no torch: the thin packed search trials (``orchestrator.search.packed_trial``)
report the macro perplexity and must start without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["perplexity", "macro_perplexity"]


def perplexity(nll: float) -> float:
    """``exp`` of a mean NLL, capped so a diverged value stays a finite number in reports."""
    return math.exp(min(nll, 50.0))


def macro_perplexity(nll: Mapping[Any, float]) -> float:
    """Mean of per-task perplexities: every evaluated task counts once, whatever its size.

    The flock report and the search trials (packed or not) report this one number; NaN
    when no task was evaluated.

    Example:
        >>> macro_perplexity({0: 0.0, 1: math.log(3.0)})  # (1 + 3) / 2
        2.0
    """
    return sum(perplexity(v) for v in nll.values()) / len(nll) if nll else float("nan")

"""The Pareto front of the search (every key minimised) and the rule that picks one point.

A row ``p`` dominates ``q`` when ``p[k] <= q[k]`` for every key and ``p[k] < q[k]`` for at
least one. The front is every row that no other row dominates: rows with identical keys
are all kept (neither dominates the other). Rows with a missing or NaN key are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["PickError", "dominates", "pareto_front", "pick_point"]


class PickError(ValueError):
    """A pick rule that is not exactly one of ``max_bytes`` / ``max_ppl``."""


def _value(row: Mapping, key: str) -> float | None:
    v = row.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def dominates(p: Mapping, q: Mapping, keys: Sequence[str]) -> bool:
    """``p`` is no worse than ``q`` on every key and strictly better on one."""
    pv, qv = [_value(p, k) for k in keys], [_value(q, k) for k in keys]
    return all(a <= b for a, b in zip(pv, qv)) and any(a < b for a, b in zip(pv, qv))


def pareto_front(rows: Sequence[Mapping], keys: Sequence[str] = ("macro_ppl", "model_bytes")) -> list[Mapping]:
    """The non-dominated rows, ordered by the first key (then the second).

    Two keys: one sweep in order of (k0, k1), O(n log n): a group of equal k0 contributes
    its rows at the group's smallest k1 if that is below every k1 seen before. More keys:
    the pairwise definition, O(n^2).

    Example:
        >>> pareto_front([{"macro_ppl": 10, "model_bytes": 5}, {"macro_ppl": 11, "model_bytes": 6}])
        [{'macro_ppl': 10, 'model_bytes': 5}]
    """
    keys = tuple(keys)
    valid = [r for r in rows if all(_value(r, k) is not None for k in keys)]
    if len(keys) != 2:
        front = [r for r in valid if not any(dominates(o, r, keys) for o in valid if o is not r)]
        return sorted(front, key=lambda r: tuple(_value(r, k) for k in keys))
    k0, k1 = keys
    ordered = sorted(valid, key=lambda r: (_value(r, k0), _value(r, k1)))
    front: list[Mapping] = []
    best = math.inf
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and _value(ordered[j], k0) == _value(ordered[i], k0):
            j += 1
        low = _value(ordered[i], k1)  # the group's smallest k1 (sorted)
        if low < best:
            front += [r for r in ordered[i:j] if _value(r, k1) == low]
            best = low
        i = j
    return front


def pick_point(
    front: Sequence[Mapping], max_bytes: float | None = None, max_ppl: float | None = None
) -> Mapping | None:
    """One point of the front by a budget rule, or ``None`` when no point meets it.

    Args:
        front: rows with ``macro_ppl`` and ``model_bytes``.
        max_bytes: the best ``macro_ppl`` among rows with ``model_bytes <= max_bytes``
            (ties: the smaller model).
        max_ppl: the smallest ``model_bytes`` among rows with ``macro_ppl <= max_ppl``
            (ties: the lower perplexity).

    Example:
        >>> pick_point(front, max_bytes=200e6)
    """
    if (max_bytes is None) == (max_ppl is None):
        raise PickError("pick_point needs exactly one of max_bytes or max_ppl")
    rows = [r for r in front if _value(r, "macro_ppl") is not None and _value(r, "model_bytes") is not None]
    if max_bytes is not None:
        ok = [r for r in rows if _value(r, "model_bytes") <= max_bytes]
        return min(ok, key=lambda r: (_value(r, "macro_ppl"), _value(r, "model_bytes")), default=None)
    ok = [r for r in rows if _value(r, "macro_ppl") <= max_ppl]
    return min(ok, key=lambda r: (_value(r, "model_bytes"), _value(r, "macro_ppl")), default=None)

"""The Pareto front of the search and the rule that picks one point.

Every key is minimised unless its mode says ``max`` (a task metric such as
``macro_exact_match``); a maximised key is compared as its negation. A row ``p`` dominates
``q`` when it is no worse on every key and better on at least one. The front is every row
that no other row dominates: rows with identical keys are all kept (neither dominates the
other). Rows with a missing or NaN key are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["PickError", "dominates", "pareto_front", "pick_point"]


class PickError(ValueError):
    """A pick rule that is not exactly one of ``max_bytes`` / ``max_ppl`` / ``min_metric``."""


def _value(row: Mapping, key: str) -> float | None:
    v = row.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _signed(row: Mapping, key: str, mode: str) -> float | None:
    """The key's value as a minimised one: negated when the key is maximised."""
    v = _value(row, key)
    return None if v is None else (-v if mode == "max" else v)


def _modes(keys: Sequence[str], modes: Sequence[str] | None) -> tuple[str, ...]:
    modes = tuple(modes) if modes is not None else ("min",) * len(keys)
    if len(modes) != len(keys) or any(m not in ("min", "max") for m in modes):
        raise ValueError(f"modes {modes} must be one 'min' or 'max' per key {tuple(keys)}")
    return modes


def dominates(p: Mapping, q: Mapping, keys: Sequence[str], modes: Sequence[str] | None = None) -> bool:
    """``p`` is no worse than ``q`` on every key and strictly better on one (``modes``: min/max per key)."""
    modes = _modes(keys, modes)
    pv, qv = [_signed(p, k, m) for k, m in zip(keys, modes)], [_signed(q, k, m) for k, m in zip(keys, modes)]
    return all(a <= b for a, b in zip(pv, qv)) and any(a < b for a, b in zip(pv, qv))


def pareto_front(
    rows: Sequence[Mapping], keys: Sequence[str] = ("macro_ppl", "model_bytes"), modes: Sequence[str] | None = None
) -> list[Mapping]:
    """The non-dominated rows, ordered by the first key (then the second), best first.

    Two keys: one sweep in order of (k0, k1), O(n log n): a group of equal k0 contributes
    its rows at the group's smallest k1 if that is below every k1 seen before. More keys:
    the pairwise definition, O(n^2).

    Example:
        >>> pareto_front([{"macro_ppl": 10, "model_bytes": 5}, {"macro_ppl": 11, "model_bytes": 6}])
        [{'macro_ppl': 10, 'model_bytes': 5}]
    """
    keys = tuple(keys)
    modes = _modes(keys, modes)
    valid = [r for r in rows if all(_value(r, k) is not None for k in keys)]
    if len(keys) != 2:
        front = [r for r in valid if not any(dominates(o, r, keys, modes) for o in valid if o is not r)]
        return sorted(front, key=lambda r: tuple(_signed(r, k, m) for k, m in zip(keys, modes)))
    (k0, m0), (k1, m1) = zip(keys, modes)
    ordered = sorted(valid, key=lambda r: (_signed(r, k0, m0), _signed(r, k1, m1)))
    front: list[Mapping] = []
    best = math.inf
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and _signed(ordered[j], k0, m0) == _signed(ordered[i], k0, m0):
            j += 1
        low = _signed(ordered[i], k1, m1)  # the group's best k1 (sorted)
        if low < best:
            front += [r for r in ordered[i:j] if _signed(r, k1, m1) == low]
            best = low
        i = j
    return front


def pick_point(
    front: Sequence[Mapping],
    max_bytes: float | None = None,
    max_ppl: float | None = None,
    min_metric: Mapping[str, float] | None = None,
    objective: str = "macro_ppl",
    mode: str = "min",
) -> Mapping | None:
    """One point of the front by a budget rule, or ``None`` when no point meets it.

    Args:
        front: rows with ``model_bytes``, ``macro_ppl`` and the search's objective.
        max_bytes: the best ``objective`` among rows with ``model_bytes <= max_bytes``
            (ties: the smaller model).
        max_ppl: the smallest ``model_bytes`` among rows with ``macro_ppl <= max_ppl``
            (ties: the lower perplexity).
        min_metric: ``{metric: bound}``: the smallest ``model_bytes`` among rows with
            ``macro_<metric> >= bound`` (ties: the higher metric).
        objective / mode: the search's quality key and whether it is minimised or maximised.

    Example:
        >>> pick_point(front, max_bytes=200e6)
        >>> pick_point(front, min_metric={"exact_match": 0.8}, objective="macro_exact_match", mode="max")
    """
    if sum(r is not None for r in (max_bytes, max_ppl, min_metric)) != 1:
        raise PickError("pick_point needs exactly one of max_bytes, max_ppl or min_metric")
    size = lambda r: _value(r, "model_bytes")  # noqa: E731
    if max_bytes is not None:
        rows = [r for r in front if _signed(r, objective, mode) is not None and size(r) is not None]
        ok = [r for r in rows if size(r) <= max_bytes]
        return min(ok, key=lambda r: (_signed(r, objective, mode), size(r)), default=None)
    if max_ppl is not None:
        key, bound, sign = "macro_ppl", max_ppl, "min"
    else:
        if len(min_metric) != 1:
            raise PickError(f"min_metric {dict(min_metric)} must hold exactly one metric")
        (name, bound), = min_metric.items()
        key, sign = f"macro_{name}", "max"
    rows = [r for r in front if _value(r, key) is not None and size(r) is not None]
    ok = [r for r in rows if _signed(r, key, sign) <= _signed({key: bound}, key, sign)]
    return min(ok, key=lambda r: (size(r), _signed(r, key, sign)), default=None)

"""The Pareto filter against a brute-force reference, ties, missing values and the pick rules."""

from __future__ import annotations

import math
import random

import pytest

from orchestrator.search.pareto import PickError, pareto_front, pick_point

KEYS = ("macro_ppl", "model_bytes")


def _brute(rows, keys):
    def dom(p, q):
        return all(p[k] <= q[k] for k in keys) and any(p[k] < q[k] for k in keys)

    return [r for r in rows if not any(dom(o, r) for o in rows)]


def _ids(rows):
    return sorted(r["id"] for r in rows)


@pytest.mark.parametrize("seed", range(30))
def test_front_equals_brute_force_on_random_points_with_ties(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    grid = rng.choice([3, 6, 50])  # small grids force many exact ties
    rows = [
        {"id": i, "macro_ppl": rng.randint(0, grid) / 2, "model_bytes": rng.randint(0, grid) * 1000} for i in range(n)
    ]
    front = pareto_front(rows, KEYS)
    assert _ids(front) == _ids(_brute(rows, KEYS))
    assert [r["macro_ppl"] for r in front] == sorted(r["macro_ppl"] for r in front)


@pytest.mark.parametrize("seed", range(10))
def test_three_keys_equal_brute_force(seed):
    rng = random.Random(100 + seed)
    keys = ("a", "b", "c")
    rows = [{"id": i, **{k: rng.randint(0, 4) for k in keys}} for i in range(25)]
    assert _ids(pareto_front(rows, keys)) == _ids(_brute(rows, keys))


def test_ties_and_missing_values():
    rows = [
        {"id": 0, "macro_ppl": 10.0, "model_bytes": 100},
        {"id": 1, "macro_ppl": 10.0, "model_bytes": 100},  # identical: both kept
        {"id": 2, "macro_ppl": 10.0, "model_bytes": 120},  # same ppl, bigger: dominated
        {"id": 3, "macro_ppl": 12.0, "model_bytes": 100},  # same size, worse: dominated
        {"id": 4, "macro_ppl": 9.0, "model_bytes": 300},
        {"id": 5, "macro_ppl": 15.0, "model_bytes": 50},
        {"id": 6, "macro_ppl": math.nan, "model_bytes": 1},  # not measured: left out
        {"id": 7, "macro_ppl": None, "model_bytes": 1},
        {"id": 8, "model_bytes": 1},
    ]
    assert [r["id"] for r in pareto_front(rows)] == [4, 0, 1, 5]
    assert pareto_front([]) == []


def test_pick_rules():
    front = [
        {"id": "big", "macro_ppl": 9.0, "model_bytes": 300},
        {"id": "mid", "macro_ppl": 10.0, "model_bytes": 100},
        {"id": "small", "macro_ppl": 15.0, "model_bytes": 50},
    ]
    assert pick_point(front, max_bytes=100)["id"] == "mid"
    assert pick_point(front, max_bytes=1000)["id"] == "big"
    assert pick_point(front, max_bytes=49) is None
    assert pick_point(front, max_ppl=10.0)["id"] == "mid"
    assert pick_point(front, max_ppl=100)["id"] == "small"
    assert pick_point(front, max_ppl=8.0) is None
    with pytest.raises(PickError):
        pick_point(front)
    with pytest.raises(PickError):
        pick_point(front, max_bytes=1, max_ppl=1)


@pytest.mark.parametrize("seed", range(20))
def test_a_maximised_metric_front_equals_brute_force_on_the_negated_metric(seed):
    rng = random.Random(200 + seed)
    grid = rng.choice([3, 8, 50])
    rows = [{"id": i, "macro_exact_match": rng.randint(0, grid) / grid, "model_bytes": rng.randint(0, grid) * 1000}
            for i in range(rng.randint(1, 40))]
    neg = [{"id": r["id"], "m": -r["macro_exact_match"], "model_bytes": r["model_bytes"]} for r in rows]
    front = pareto_front(rows, ("macro_exact_match", "model_bytes"), ("max", "min"))
    assert _ids(front) == _ids(_brute(neg, ("m", "model_bytes")))
    assert [r["macro_exact_match"] for r in front] == sorted((r["macro_exact_match"] for r in front), reverse=True)
    with pytest.raises(ValueError, match="one 'min' or 'max' per key"):
        pareto_front(rows, ("macro_exact_match", "model_bytes"), ("max",))


def test_pick_rules_on_a_task_metric():
    front = [
        {"id": "big", "macro_ppl": 9.0, "macro_exact_match": 0.9, "model_bytes": 300},
        {"id": "mid", "macro_ppl": 10.0, "macro_exact_match": 0.8, "model_bytes": 100},
        {"id": "small", "macro_ppl": 15.0, "macro_exact_match": 0.5, "model_bytes": 50},
    ]
    on = dict(objective="macro_exact_match", mode="max")
    assert pick_point(front, min_metric={"exact_match": 0.8}, **on)["id"] == "mid"  # the smallest reaching 0.8
    assert pick_point(front, min_metric={"exact_match": 0.85}, **on)["id"] == "big"
    assert pick_point(front, min_metric={"exact_match": 0.5}, **on)["id"] == "small"
    assert pick_point(front, min_metric={"exact_match": 0.95}, **on) is None
    assert pick_point(front, max_bytes=120, **on)["id"] == "mid"  # the best metric within the budget
    assert pick_point(front, max_bytes=1000, **on)["id"] == "big"
    assert pick_point(front, max_ppl=12.0, **on)["id"] == "mid"  # a perplexity bound still works
    with pytest.raises(PickError):
        pick_point(front, max_bytes=100, min_metric={"exact_match": 0.8}, **on)

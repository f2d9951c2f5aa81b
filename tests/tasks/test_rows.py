"""Examples -> rows: one example per row, right padding, left truncation or drop, and their counts."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import TaskDataError
from tasks.examples import Examples
from tasks.rows import example_rows, hold_out_examples

PAD = 0


def _examples(*pairs: tuple[int, int]) -> Examples:
    """Example i: ``p`` prompt tokens (ids 1..p) then ``c`` completion tokens (ids 101..100+c)."""
    ids = [np.array([*range(1, p + 1), *range(101, 101 + c)], dtype=np.int32) for p, c in pairs]
    scored = [np.array([False] * p + [True] * c) for p, c in pairs]
    keep = np.array([p for p, _ in pairs])
    return Examples(ids, scored, keep, np.arange(len(pairs)) + 10, 0, "completion", "prompt_completion")


def test_rows_are_right_padded_and_pads_never_scored():
    ex = _examples((3, 2), (1, 4))
    rows, mask, counts = example_rows(ex, np.array([0, 1]), 8, PAD)
    assert rows.tolist() == [[1, 2, 3, 101, 102, 0, 0, 0], [1, 101, 102, 103, 104, 0, 0, 0]]
    assert mask.tolist() == [[False, False, False, True, True, False, False, False],
                             [False, True, True, True, True, False, False, False]]
    assert counts == {"examples": 2, "truncated": 0, "dropped": 0, "tokens": 6}


def test_column_zero_is_never_scored():
    ex = _examples((0, 3))  # no prompt: the first completion token has no context
    rows, mask, _ = example_rows(ex, np.array([0]), 4, PAD)
    assert rows[0].tolist() == [101, 102, 103, 0] and mask[0].tolist() == [False, True, True, False]


def test_left_truncation_cuts_the_prompt_and_keeps_the_completion():
    ex = _examples((10, 3), (2, 2))
    rows, mask, counts = example_rows(ex, np.array([0, 1]), 6, PAD, truncation="left")
    assert rows[0].tolist() == [8, 9, 10, 101, 102, 103]  # the 7 oldest prompt tokens are gone
    assert mask[0].tolist() == [False, False, False, True, True, True]
    assert counts["truncated"] == 1 and counts["dropped"] == 0 and counts["examples"] == 2


def test_drop_leaves_long_examples_out():
    ex = _examples((10, 3), (2, 2), (4, 3))
    rows, mask, counts = example_rows(ex, np.array([0, 1, 2]), 6, PAD, truncation="drop")
    assert counts == {"examples": 1, "truncated": 0, "dropped": 2, "tokens": 2}
    assert rows.tolist() == [[1, 2, 101, 102, 0, 0]]


def test_completion_that_fills_the_row_is_an_error_under_left():
    ex = _examples((2, 6))
    with pytest.raises(TaskDataError) as info:
        example_rows(ex, np.array([0]), 6, PAD, truncation="left", task="acme", where="a.jsonl")
    msg = str(info.value)
    assert "'acme'" in msg and "row 10 of 'a.jsonl'" in msg and "'completion'" in msg
    assert "seq_len to at least 7" in msg and "truncation: drop" in msg
    # one token of prompt is enough
    rows, _, counts = example_rows(_examples((2, 5)), np.array([0]), 6, PAD)
    assert rows[0].tolist() == [2, 101, 102, 103, 104, 105] and counts["truncated"] == 1


def test_hold_out_examples():
    tr, ev = hold_out_examples(100, 0.1, seed=0, salt="t")
    tr2, ev2 = hold_out_examples(100, 0.1, seed=0, salt="t")
    assert np.array_equal(ev, ev2) and len(ev) == 10 and sorted([*tr, *ev]) == list(range(100))
    assert not np.array_equal(ev, hold_out_examples(100, 0.1, seed=1, salt="t")[1])
    assert not np.array_equal(ev, hold_out_examples(100, 0.1, seed=0, salt="u")[1])
    assert [len(x) for x in hold_out_examples(2, 0.01, 0, "t")] == [1, 1]
    assert [len(x) for x in hold_out_examples(3, 0.99, 0, "t")] == [1, 2]

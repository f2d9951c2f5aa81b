"""Instruction examples -> fixed-length rows: one example per row, right-padded, never split.

One example per row means no token can attend across an example boundary without any
attention mask: the row holds a single example followed by padding, and with right padding
in a causal LM no real token attends to a pad (pads only come after it). Pads are never
scored. An example longer than ``L = seq_len`` is truncated from the left of its prompt
(``truncation: left``, the completion kept whole) or dropped (``truncation: drop``); both are
counted.

The eval split of instruction data holds out whole examples: ``ceil(eval_fraction * n)`` of
them (at least 1, at most n - 1), in the order of a seeded hash of their position.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from tasks.errors import TaskDataError
from tasks.examples import Examples
from tasks.packing import splitmix64

__all__ = ["hold_out_examples", "example_rows", "completion_starts"]


def hold_out_examples(n: int, eval_fraction: float, seed: int, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` examples into (train positions, eval positions), both sorted, disjoint, non-empty.

    Args:
        n: number of examples (at least 2).
        eval_fraction: share held out (0 < f < 1).
        seed, salt: the same seed and salt (the task's name) give the same split.
    """
    if n < 2:
        raise ValueError("hold_out_examples needs at least 2 examples")
    salt_int = int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:8], "little")
    h = splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(salt_int))
    order = np.lexsort((np.arange(n), h))
    k = min(max(math.ceil(eval_fraction * n), 1), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def example_rows(
    ex: Examples,
    positions: np.ndarray,
    seq_len: int,
    pad_id: int,
    truncation: str = "left",
    task: str = "?",
    where: str = "?",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows of the examples at ``positions`` (in order): one example each, right-padded.

    Args:
        ex: the tokenised examples.
        positions: which of them.
        seq_len: L.
        pad_id: the pad token (never scored).
        truncation: ``left`` or ``drop`` for an example longer than L.
        task, where: name the task and the file in errors.

    Returns:
        (rows int32 (R, L), mask bool (R, L), counts ``{"examples", "truncated", "dropped",
        "tokens"}``); ``mask[:, 0]`` is False (column 0 is never a target), ``tokens`` is the
        number of scored tokens.

    Raises:
        TaskDataError: with ``truncation: left``, an example whose completion alone leaves no
            prompt token in the row (the row is named; ``truncation: drop`` drops it instead).
    """
    keep, cuts, truncated, dropped = [], [], 0, 0
    for p in positions:
        length = len(ex.ids[p])
        if length <= seq_len:
            keep.append(p)
            cuts.append(0)
            continue
        cut = length - seq_len
        if truncation == "drop":
            dropped += 1
            continue
        if cut >= ex.keep_from[p]:
            need = length - int(ex.keep_from[p]) + 1
            raise TaskDataError(
                f"task {task!r}: row {int(ex.rows[p])} of {where!r}: its {ex.target_field!r} needs {need - 1} tokens, "
                f"so no prompt token is left in a row of {seq_len} after truncating from the left "
                "(the example would be "
                f"empty of context); raise train.seq_len to at least {need}, set truncation: drop, or shorten that "
                f"{ex.target_field!r}"
            )
        truncated += 1
        keep.append(p)
        cuts.append(cut)
    rows = np.full((len(keep), seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(keep), seq_len), dtype=bool)
    for r, (p, cut) in enumerate(zip(keep, cuts)):
        ids = ex.ids[p][cut:]
        rows[r, : len(ids)] = ids
        mask[r, : len(ids)] = ex.scored[p][cut:]
    mask[:, 0] = False
    counts = {"examples": len(keep), "truncated": truncated, "dropped": dropped, "tokens": int(mask.sum())}
    return rows, mask, counts


def completion_starts(ex: Examples, positions: np.ndarray, seq_len: int, truncation: str = "left") -> np.ndarray:
    """Where the final completion starts in each row :func:`example_rows` makes of ``positions``.

    The rows it keeps, in the same order: ``keep_from`` less the tokens cut from the left. The
    tokens before it are the prompt a generation metric feeds the model (the unscored prefix,
    the earlier turns too for ``messages``). Call it only after :func:`example_rows` accepted
    the same arguments (it raises on the example it cannot truncate; this does not check).

    Returns:
        int64 (R,): R = rows kept.
    """
    starts = []
    for p in positions:
        cut = max(len(ex.ids[p]) - seq_len, 0)
        if cut and truncation == "drop":
            continue
        starts.append(int(ex.keep_from[p]) - cut)
    return np.asarray(starts, dtype=np.int64)

"""Cut a batch of right-padded rows to the columns its loss needs (dynamic padding).

Why: instruction rows are one example each, right-padded to ``train.seq_len``; a job with
``seq_len: 512`` and examples of ~150 tokens would otherwise run every block, the head and
the frozen prefix on ~70% padding. In a causal LM, column ``t``'s output depends only on
columns ``<= t``, and the loss reads column ``t`` only when token ``t + 1`` is scored, so
every column after a batch's last scored token can be dropped without changing one loss
value, gradient or NLL (exact, not approximate). Raw-text rows (``scored is None``: every
token counts) and rows whose last token is scored keep their full width.

Frozen-prefix states computed for a narrower batch are kept zero beyond that width
(:class:`models.prefix_cache.PrefixCache`): a later, wider batch reads zeros only in
columns after that row's own last scored token, which no scored column attends to.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["scored_width", "trim_columns", "scored_positions"]


def scored_width(scored: torch.Tensor | None, length: int) -> int:
    """Columns ``0..w-1`` a batch needs: through its last scored token (``length`` if ``scored`` is ``None``).

    ``scored`` is the batch's (B, L) bool mask (True where token t is a target). A batch with
    no scored token keeps 2 columns (its loss is 0 either way). A host mask (training batches
    read from the row store) costs no device sync; a GPU mask reads one integer back.
    """
    if scored is None or length <= 2:
        return length
    if scored.device.type == "cpu":
        cols = np.flatnonzero(scored.numpy().any(axis=0))
        last = int(cols[-1]) if len(cols) else -1
    else:
        cols_t = scored.any(dim=0)
        last = int(torch.arange(length, device=cols_t.device).masked_fill(~cols_t, -1).max())
    return max(2, last + 1)


def scored_positions(scored: torch.Tensor) -> torch.Tensor:
    """Flat (row-major over (B, W)) positions whose next token is scored: where the loss reads the head.

    Position ``t`` of a row predicts token ``t + 1``, so it counts when ``scored[:, t + 1]``.
    Computed where the mask lives: on the host (no device sync) for training batches, which
    then carry it to the device with the batch (``Batch.targets``).
    """
    if scored.device.type == "cpu":
        nxt = np.zeros(scored.shape, dtype=bool)
        nxt[:, :-1] = scored.numpy()[:, 1:]
        return torch.from_numpy(np.flatnonzero(nxt))
    nxt_t = torch.zeros_like(scored)
    nxt_t[:, :-1] = scored[:, 1:]
    return nxt_t.reshape(-1).nonzero().squeeze(1)


def trim_columns(ids: torch.Tensor, scored: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ids`` (B, L) and ``scored`` cut to :func:`scored_width` columns (views; unchanged when nothing to cut)."""
    w = scored_width(scored, ids.shape[1])
    if w == ids.shape[1]:
        return ids, scored
    return ids[:, :w], None if scored is None else scored[:, :w]

"""The ``flock.prefix_cache:`` setting: how the frozen lower blocks' states are cached in a flock worker.

With adapters on the top blocks only, the blocks below them are a fixed function of the
tokens; their output for a row is computed when a batch first needs it and kept, within
``budget_gb`` per worker, for the rows used again (every method replays the same batches;
every evaluation pass reads the same eval rows). See :mod:`models.prefix_cache`.

Example (YAML, inside a job)::

    flock:
      prefix_cache: {mode: auto, budget_gb: 8}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.strict import Strict

__all__ = ["PrefixCacheSpec"]


class PrefixCacheSpec(Strict):
    """How a flock worker caches the frozen prefix.

    Args:
        mode: ``auto`` caches when it saves at least 20% of the frozen-block forwards, judged
            from the steps, batch, methods, rows and budget (the worker logs the decision and
            its figures); ``on`` always caches; ``off`` runs the whole model at every use.
        budget_gb: the most memory (GiB) one worker's cached states may take: pinned host memory
            on a GPU, plain memory on the CPU. Rows beyond it are recomputed when used. It must
            hold at least one batch (``max(train.batch_size, train.eval_batch_size)`` rows of
            ``train.seq_len`` x hidden size); a smaller one is refused before the job starts.
    """

    mode: Literal["auto", "on", "off"] = "auto"
    budget_gb: float = Field(4.0, gt=0)

"""The job's tokenised rows on disk, written once by the driver, memory-mapped by every reader.

Why a store of our own and not Ray Data shards: the flock draws (task, row) pairs at random,
with a temperature over task sizes, from tasks spread over workers; Ray Data's
``get_dataset_shard`` serves each worker a sequential stream of a shard, which cannot answer
"row 17 of task 3" without reading the stream up to it. Fixed-length rows of token ids in one
flat file per column answer it with one memory-mapped slice: row ``i`` of task ``t`` is row
``offset[t] + i``. So:

* the driver appends each task's rows as the task is built and keeps none resident (its own
  views of the rows are file-backed pages the kernel may drop);
* a worker maps the files and touches only its own tasks' rows, batch by batch: its memory
  grows with the rows it reads, never with the dataset, and the workers of one node share
  the page cache;
* the store lives in the run's folder (beside Ray's storage), which every node sees.

Layout of a store folder (all little-endian, C order)::

    index.json          {"version", "seq_len", "rows": {column: total rows},
                         "tasks": [{"name", "train": [offset, n], "eval": [offset, n],
                                    "train_mask": offset | null, "eval_mask": offset | null}]}
    train_ids.bin       int64 (rows, seq_len): every task's training rows, task after task
    eval_ids.bin        int64 (rows, seq_len)
    train_mask.bin      bool (rows, seq_len): only the tasks with a scored-token mask
    eval_mask.bin       bool (rows, seq_len)

Token ids stay int64, the dtype every consumer indexes with, so a view is a tensor without a
copy. The folder is written under a temporary name and renamed whole
(:func:`models.files.atomic_dir`), so a reader never sees half a store.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.errors import TaskDataError

if TYPE_CHECKING:
    import torch

    from tasks.task_data import TaskData

__all__ = ["RowStore", "RowStoreWriter", "attach_rows", "owned_rows", "INDEX_FILE"]

INDEX_FILE = "index.json"
_COLUMNS = {"train_ids": np.int64, "eval_ids": np.int64, "train_mask": np.bool_, "eval_mask": np.bool_}
_VERSION = 1


class RowStoreWriter:
    """Appends tasks' rows to a store folder as the tasks are built; :meth:`finish` writes the index.

    Args:
        folder: an empty folder (the temporary one of :func:`models.files.atomic_dir`).
        seq_len: tokens per row (L); a task with another row length is refused.

    Example:
        >>> with atomic_dir(out / "rows") as tmp:
        ...     w = RowStoreWriter(tmp, 64)
        ...     data = build_task_data(specs, tok, 64, sink=w.add)
        ...     w.finish()
    """

    def __init__(self, folder: str | Path, seq_len: int) -> None:
        self.folder, self.seq_len = Path(folder), int(seq_len)
        self.rows = dict.fromkeys(_COLUMNS, 0)
        self.tasks: list[dict] = []
        self._files = {c: open(self.folder / f"{c}.bin", "wb") for c in _COLUMNS}  # noqa: SIM115

    def _append(self, column: str, arr: np.ndarray) -> int:
        if arr.ndim != 2 or arr.shape[1] != self.seq_len:
            raise TaskDataError(f"row store: {column} rows of shape {tuple(arr.shape)}, expected (n, {self.seq_len})")
        at = self.rows[column]
        self._files[column].write(np.ascontiguousarray(arr, dtype=_COLUMNS[column]).tobytes())
        self.rows[column] += int(arr.shape[0])
        return at

    def add(self, task: TaskData) -> TaskData:
        """Write ``task``'s rows and masks; return it without them (they are read back by :func:`attach_rows`).

        What stays on the task: its name, counts, stats and prompt lengths (small, per row),
        which the report, the metric plan and the sampler's sizes need.
        """
        entry: dict = {"name": task.name}
        for side in ("train", "eval"):
            ids = getattr(task, f"{side}_ids")
            entry[side] = [self._append(f"{side}_ids", ids.numpy()), int(ids.shape[0])]
            mask = getattr(task, f"{side}_mask")
            entry[f"{side}_mask"] = None if mask is None else self._append(f"{side}_mask", mask.numpy())
        self.tasks.append(entry)
        return dataclasses.replace(task, train=None, eval=None, train_ids=None, eval_ids=None,
                                   train_mask=None, eval_mask=None)

    def finish(self) -> None:
        """Close the column files and write the index (the store is complete only with it)."""
        for f in self._files.values():
            f.close()
        index = {"version": _VERSION, "seq_len": self.seq_len, "rows": self.rows, "tasks": self.tasks}
        (self.folder / INDEX_FILE).write_text(json.dumps(index))

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


class RowStore:
    """A finished store, memory-mapped read-only (copy-on-write pages: a write never reaches the file).

    Args:
        folder: the store's folder (holding ``index.json``).

    Raises:
        TaskDataError: no index, or one of another version, or a column file shorter than it says.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        f = self.folder / INDEX_FILE
        if not f.is_file():
            raise TaskDataError(f"no row store at {self.folder} ({INDEX_FILE} missing): re-run the job to rebuild it")
        index = json.loads(f.read_text())
        if index.get("version") != _VERSION:
            raise TaskDataError(f"row store {self.folder} has version {index.get('version')}, expected {_VERSION}: "
                                "re-run the job to rebuild it")
        self.seq_len: int = int(index["seq_len"])
        self.tasks: list[dict] = index["tasks"]
        self.names: list[str] = [t["name"] for t in self.tasks]
        self._maps = {c: self._map(c, int(n)) for c, n in index["rows"].items()}

    def _map(self, column: str, rows: int) -> np.ndarray:
        dtype, path = np.dtype(_COLUMNS[column]), self.folder / f"{column}.bin"
        if rows == 0:
            return np.empty((0, self.seq_len), dtype=dtype)
        need = rows * self.seq_len * dtype.itemsize
        if not path.is_file() or path.stat().st_size < need:
            raise TaskDataError(f"row store file {path} is shorter than its index says: re-run the job to rebuild it")
        return np.memmap(path, dtype=dtype, mode="c", shape=(rows, self.seq_len))

    def __len__(self) -> int:
        return len(self.tasks)

    def count(self, task: int, side: str = "train") -> int:
        """Rows of ``task`` on ``side`` (``train`` or ``eval``), from the index alone."""
        return int(self.tasks[task][side][1])

    def ids(self, task: int, side: str = "train") -> np.ndarray:
        """(n, L) int64 view of a task's rows: no copy, nothing read until indexed."""
        at, n = self.tasks[task][side]
        return self._maps[f"{side}_ids"][at : at + n]

    def mask(self, task: int, side: str = "train") -> np.ndarray | None:
        """(n, L) bool view of a task's scored-token mask, or ``None`` (every token scored)."""
        at = self.tasks[task][f"{side}_mask"]
        if at is None:
            return None
        return self._maps[f"{side}_mask"][at : at + self.count(task, side)]

    def nbytes(self) -> int:
        """Bytes the store's files take on disk (the index included)."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    import torch

    return None if a is None else torch.from_numpy(a)


def attach_rows(data: list, store: RowStore) -> None:
    """Give tasks written by :class:`RowStoreWriter` their rows back, as tensors viewing the store.

    Every consumer of ``TaskData.train_ids`` / ``eval_ids`` / masks (the search stage, the
    metric plan, ``loraflock adapt``) then reads the same rows, paged in from the file on use.
    """
    if [d.name for d in data] != store.names:
        raise TaskDataError(f"row store {store.folder} holds other tasks than the job's: re-run the job to rebuild it")
    for t, d in enumerate(data):
        for side in ("train", "eval"):
            setattr(d, f"{side}_ids", _tensor(store.ids(t, side)))
            setattr(d, f"{side}_mask", _tensor(store.mask(t, side)))


def owned_rows(store: RowStore, owned: list[int]) -> tuple[dict, dict, dict, dict]:
    """A worker's tasks as ``(train, eval, train_mask, eval_mask)``: slot -> CPU tensor viewing the store.

    Slot ``s`` is task ``owned[s]``, as in ``models.train.loop.FlockData``; no row is read here.
    """
    train = {s: _tensor(store.ids(g, "train")) for s, g in enumerate(owned)}
    evals = {s: _tensor(store.ids(g, "eval")) for s, g in enumerate(owned)}
    tmask = {s: _tensor(store.mask(g, "train")) for s, g in enumerate(owned)}
    emask = {s: _tensor(store.mask(g, "eval")) for s, g in enumerate(owned)}
    return train, evals, tmask, emask

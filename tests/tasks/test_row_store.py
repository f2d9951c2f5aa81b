"""The row store: tasks written as they are built read back identical, and nothing half-written is ever read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.files import atomic_dir
from tasks import TaskSetSpec, TaskSpec, build_task_data
from tasks.errors import TaskDataError
from tasks.row_store import RowStore, RowStoreWriter, attach_rows, owned_rows
from tasks.tokenizer import bytes_tokenizer


def _specs(tmp_path):
    """One packed text task (no masks) and a set of three instruction tasks (masked rows)."""
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": c * (30 + 7 * i)}) + "\n" for i, c in enumerate("abcdefghij")))
    rows = [{"who": w, "prompt": f"{w}{i}?", "completion": f"{w}{i}!" * (1 + i % 3)}
            for w, n in (("x", 9), ("y", 5), ("z", 3)) for i in range(n)]
    pd.DataFrame(rows).to_parquet(tmp_path / "chats.parquet")
    tasks = [TaskSpec(name="notes", source={"kind": "files", "path": str(text)}, eval_fraction=0.3)]
    src = {"kind": "files", "path": str(tmp_path / "chats.parquet"), "example_format": "prompt_completion"}
    sets = [TaskSetSpec(name="chats", task_field="who", source=src)]
    return tasks, sets


def _stored(tmp_path, tasks, sets):
    seen = []
    with atomic_dir(tmp_path / "rows") as tmp:
        w = RowStoreWriter(tmp, 16)

        def sink(d):
            slim = w.add(d)
            seen.append(slim)
            return slim

        data = build_task_data(tasks, bytes_tokenizer(), 16, task_sets=sets, sink=sink)
        w.finish()
    return data, seen


def test_stored_rows_equal_in_memory_rows(tmp_path):
    tasks, sets = _specs(tmp_path)
    mem = build_task_data(tasks, bytes_tokenizer(), 16, task_sets=sets)
    data, seen = _stored(tmp_path, tasks, sets)
    assert len(seen) == len(mem) == 4
    # as built, each task reached the writer and kept no rows (counts and stats stay)
    assert all(d.train_ids is None and d.train is None and d.train_examples > 0 for d in data)
    store = RowStore(tmp_path / "rows")
    attach_rows(data, store)
    assert store.names == [d.name for d in mem]
    assert any(d.train_mask is not None for d in mem) and mem[0].train_mask is None
    for a, b in zip(mem, data):
        assert a.train_examples == b.train_examples and a.stats == b.stats
        for f in ("train_ids", "eval_ids", "train_mask", "eval_mask"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f
            if x is not None:
                assert y.dtype == x.dtype and torch.equal(x, y), (a.name, f)
    # the views come from the mapped file (no copy): the store's bytes are exactly the rows
    rows = sum(len(d.train_ids) for d in mem)
    assert (tmp_path / "rows" / "train_ids.bin").stat().st_size == rows * 16 * 8
    assert isinstance(store.ids(0), np.memmap)


def test_owned_rows_are_only_the_owned_tasks(tmp_path):
    tasks, sets = _specs(tmp_path)
    mem = build_task_data(tasks, bytes_tokenizer(), 16, task_sets=sets)
    _stored(tmp_path, tasks, sets)
    store = RowStore(tmp_path / "rows")
    train, evals, tmask, emask = owned_rows(store, [3, 1])
    assert sorted(train) == [0, 1]
    assert torch.equal(train[0], mem[3].train_ids) and torch.equal(evals[1], mem[1].eval_ids)
    assert torch.equal(tmask[0], mem[3].train_mask) and (emask[1] is None) == (mem[1].eval_mask is None)


def test_a_failed_build_leaves_no_store(tmp_path):
    tasks, _ = _specs(tmp_path)
    bad = TaskSpec(name="gone", source={"kind": "files", "path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(TaskDataError), atomic_dir(tmp_path / "rows") as tmp:
        w = RowStoreWriter(tmp, 16)
        try:
            build_task_data([*tasks, bad], bytes_tokenizer(), 16, sink=w.add)
        finally:
            w.abort()
    assert not (tmp_path / "rows").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rows")]  # the temporary folder is gone too


def test_a_truncated_store_is_refused_with_the_fix(tmp_path):
    tasks, sets = _specs(tmp_path)
    _stored(tmp_path, tasks, sets)
    f = tmp_path / "rows" / "train_ids.bin"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(TaskDataError, match="shorter than its index.*re-run"):
        RowStore(tmp_path / "rows")
    with pytest.raises(TaskDataError, match="no row store"):
        RowStore(tmp_path / "elsewhere")

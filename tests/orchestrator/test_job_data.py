"""The job's data on the driver: rows written to the run's row store as built, views kept, bad input told early."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from orchestrator.data import build_job_data
from orchestrator.spec import JobSpec
from tasks import build_task_data
from tasks.errors import TaskDataError
from tasks.row_store import RowStore

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 257, "max_position_embeddings": 64}


def _spec(path, **kw) -> JobSpec:
    src = {"kind": "files", "path": str(path), "example_format": "prompt_completion"}
    return JobSpec.model_validate({
        "name": "j", "base": {"random_init": TINY, "tokenizer": "bytes"}, "train": {"seq_len": 24},
        "task_sets": [{"name": "s", "task_field": "who", "source": src}], **kw,
    })


def _table(tmp_path, sizes) -> str:
    rows = [{"who": w, "prompt": f"{w}{i}?", "completion": f"{w}{i}!"} for w, n in sizes.items() for i in range(n)]
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    return str(tmp_path / "t.parquet")


def test_rows_go_to_the_store_and_the_tasks_view_it(tmp_path, capsys):
    path = _table(tmp_path, {"a": 6, "b": 4, "c": 1})  # c: one example, nothing to hold out -> skipped
    spec = _spec(path)
    mem = build_task_data([], "bytes", 24, task_sets=spec.task_sets)
    data = build_job_data(spec, rows_dir=tmp_path / "run" / ".rows")
    assert data.rows_dir == tmp_path / "run" / ".rows" and [d.name for d in data] == ["a", "b"]
    store = RowStore(data.rows_dir)
    for a, b in zip(mem, data):
        assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.eval_mask, b.eval_mask)
        assert b.train is None  # no second in-memory copy of the rows
    assert store.count(0) == mem[0].train_examples
    err = capsys.readouterr()
    assert "warning: 1 tasks of task sets skipped" in err.out + err.err and "s:c" in err.out + err.err


def test_failed_data_leaves_no_folder(tmp_path):
    spec = _spec(tmp_path / "missing.parquet")
    with pytest.raises(TaskDataError):
        build_job_data(spec, rows_dir=tmp_path / "run" / ".rows")
    assert not (tmp_path / "run").exists()

"""Task sets: one table split by a column, one task per file, names, selection, eval splits, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tasks import TaskSetSpec, TaskSpec, build_task_data, describe_task_sets
from tasks.errors import TaskDataError
from tasks.task_sets import task_name_of
from tasks.tokenizer import bytes_tokenizer

EOS = 256
# customer -> number of rows: unequal, with names that need cleaning
SIZES = {"ACME Corp.": 12, "beta/eu": 7, "gamma": 5, "delta": 2, "epsilon": 1}


def _table(tmp_path, sizes=SIZES, test_every: int = 0, name="chats.parquet") -> str:
    rows = []
    for cust, n in sizes.items():
        for i in range(n):
            split = "test" if test_every and i % test_every == 0 else "train"
            rows.append(
                {"customer_id": cust, "prompt": f"{cust[0]}{i}?", "completion": f"{cust[0]}{i}!", "split": split}
            )
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # tasks interleaved
    path = tmp_path / name
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _set(path, **kw) -> TaskSetSpec:
    base = {"name": "customers", "source": {"kind": "files", "path": path, "example_format": "prompt_completion"},
            "task_field": "customer_id"}
    return TaskSetSpec(**{**base, **kw})


def _letters(d) -> set[str]:
    return {chr(int(r[0])) for r in d.train_ids} | {chr(int(r[0])) for r in d.eval_ids}


def test_column_split_min_examples_and_mapping(tmp_path):
    data = build_task_data([], bytes_tokenizer(), 16, task_sets=[_set(_table(tmp_path), min_examples=2)])
    assert [d.name for d in data] == ["ACME_Corp.", "beta_eu", "gamma", "delta"]  # largest first
    sizes = {d.name: d.train_examples + d.eval_examples for d in data}
    assert sizes == {"ACME_Corp.": 12, "beta_eu": 7, "gamma": 5, "delta": 2}
    for d in data:  # each task holds its own rows only
        assert _letters(d) == {d.stats["task_set"]["value"][0]}
        assert d.eval_examples == max(1, int(np.ceil(0.1 * (d.train_examples + d.eval_examples))))
    report = data.task_sets["customers"]
    assert report["field"] == "customer_id"
    assert report["tasks"] == {"ACME Corp.": "ACME_Corp.", "beta/eu": "beta_eu", "gamma": "gamma", "delta": "delta"}
    assert report["skipped"] == {"epsilon": "1 rows < min_examples 2"}
    assert data[0].stats["task_set"] == {
        "set": "customers",
        "field": "customer_id",
        "value": "ACME Corp.",
        "eval": "fraction",
    }


def test_max_tasks_largest_and_seeded_sample(tmp_path):
    path = _table(tmp_path)
    largest = build_task_data([], bytes_tokenizer(), 16, task_sets=[_set(path, max_tasks=2)])
    assert [d.name for d in largest] == ["ACME_Corp.", "beta_eu"]
    assert "beyond max_tasks 2" in largest.task_sets["customers"]["skipped"]["gamma"]
    picks = {tuple(d.name for d in build_task_data([], bytes_tokenizer(), 16, seed=s,
                                                   task_sets=[_set(path, max_tasks=2, pick="sample")]))
             for s in range(6)}
    assert len(picks) > 1  # the seed chooses
    again = build_task_data([], bytes_tokenizer(), 16, seed=3, task_sets=[_set(path, max_tasks=2, pick="sample")])
    assert tuple(d.name for d in again) in picks


def test_eval_split_by_column_value(tmp_path):
    data = build_task_data(
        [],
        bytes_tokenizer(),
        16,
        task_sets=[_set(_table(tmp_path, test_every=3), eval_split={"field": "split", "value": "test"})],
    )
    acme = data[0]
    assert acme.eval_examples == 4 and acme.train_examples == 8  # rows 0, 3, 6, 9 of 12
    evals = sorted(bytes(int(t) for t in r if t != EOS).decode()[:3] for r in acme.eval_ids)
    assert evals == ["A0?", "A3?", "A6?", "A9?"]
    assert acme.stats["task_set"]["eval"] == "eval_split"


def test_eval_split_fallback_and_names_prefix(tmp_path):
    sizes = {"a": 4, "b": 3, "c": 2}
    rows = [
        {
            "customer_id": c,
            "prompt": "p",
            "completion": "c",
            "split": "test" if c == "c" or (c == "a" and i == 0) else "train",
        }
        for c, n in sizes.items()
        for i in range(n)
    ]
    path = tmp_path / "t.parquet"
    pd.DataFrame(rows).to_parquet(path)
    data = build_task_data(
        [],
        bytes_tokenizer(),
        16,
        task_sets=[_set(str(path), name_prefix="cust-", eval_split={"field": "split", "value": "test"})],
    )
    assert [(d.name, d.stats["task_set"]["eval"]) for d in data] == [("cust-a", "eval_split"), ("cust-b", "fraction")]
    assert data.task_sets["customers"]["skipped"] == {"c": "every row is an eval_split row: nothing to train on"}
    assert data.task_sets["customers"]["tasks"] == {"a": "cust-a", "b": "cust-b"}


def test_explicit_tasks_and_sets_combine(tmp_path):
    path = _table(tmp_path)
    extra = tmp_path / "x.jsonl"
    extra.write_text("".join(json.dumps({"text": "x" * 40}) + "\n" for _ in range(3)), encoding="utf-8")
    tasks = [TaskSpec(name="notes", source={"kind": "files", "path": str(extra)})]
    data = build_task_data(tasks, bytes_tokenizer(), 16, task_sets=[_set(path, max_tasks=2)])
    assert [d.name for d in data] == ["notes", "ACME_Corp.", "beta_eu"]
    assert data[0].train_mask is None and data[1].train_mask is not None
    with pytest.raises(TaskDataError, match="'gamma'.*another task already has.*name_prefix"):
        build_task_data([TaskSpec(name="gamma", source={"kind": "files", "path": str(extra)})], bytes_tokenizer(), 16,
                        task_sets=[_set(path)])


def test_one_task_per_file(tmp_path):
    (tmp_path / "d").mkdir()
    for stem, n in (("acme", 6), ("beta corp", 3)):
        rows = [{"prompt": f"{stem[0]}{i}", "completion": "ok"} for i in range(n)]
        (tmp_path / "d" / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ts = TaskSetSpec(
        name="files",
        source={"kind": "files", "path": str(tmp_path / "d" / "*.jsonl"), "example_format": "prompt_completion"},
        task_per_file=True,
    )
    data = build_task_data([], bytes_tokenizer(), 16, task_sets=[ts])
    assert [(d.name, d.train_examples + d.eval_examples) for d in data] == [("acme", 6), ("beta_corp", 3)]
    assert data.task_sets["files"]["tasks"] == {str(tmp_path / "d" / "acme.jsonl"): "acme",
                                                str(tmp_path / "d" / "beta corp.jsonl"): "beta_corp"}
    assert {chr(int(r[0])) for r in data[1].train_ids} == {"b"}


def test_text_task_set_packs_each_task(tmp_path):
    rows = [{"lang": lang, "text": lang[0] * 30} for lang in ("en", "fr") for _ in range(6)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ts = TaskSetSpec(name="langs", source={"kind": "files", "path": str(path)}, task_field="lang", eval_fraction=0.3)
    data = build_task_data([], bytes_tokenizer(), 16, task_sets=[ts])
    for d in data:
        assert d.stats["format"] == "text" and d.train_mask is None
        assert {chr(t) for t in d.train_ids.flatten().tolist() if t != EOS} == {d.name[0]}


def test_builtin_instruct_suite_as_task_sets():
    from tasks.builtin.instruct import instruct_task_sets

    sets = instruct_task_sets()
    summary = describe_task_sets(sets)
    assert [s["tasks"] for s in summary] == [9, 9]
    assert all(s["max"] >= 5 * s["min"] for s in summary)  # unequal sizes
    data = build_task_data([], bytes_tokenizer(), 256, task_sets=sets[:1])
    assert data[0].name == "submodule-asyncio" and data[-1].name == "submodule-json"


def test_describe_task_sets(tmp_path):
    (s,) = describe_task_sets([_set(_table(tmp_path), min_examples=3)])
    assert s == {"name": "customers", "field": "customer_id", "values": 5, "tasks": 3, "skipped": 2,
                 "min": 5, "median": 7.0, "max": 12}


def test_task_name_of():
    assert task_name_of("ACME Corp./EU", "cust-") == "cust-ACME_Corp._EU"
    assert task_name_of(42) == "42" and task_name_of("..") == "__"
    long = task_name_of("x" * 100)
    assert len(long) == 64 and long != task_name_of("x" * 99) and long.startswith("x" * 55 + "-")


# ---- bad input ----

def _error(tmp_path, sizes=SIZES, **kw) -> str:
    with pytest.raises(TaskDataError) as info:
        build_task_data([], bytes_tokenizer(), 16, task_sets=[_set(_table(tmp_path, sizes), **kw)])
    msg = str(info.value)
    assert "'customers'" in msg and "chats.parquet" in msg
    return msg


def test_missing_task_field_lists_columns(tmp_path):
    msg = _error(tmp_path, task_field="tenant")
    assert "no column 'tenant'" in msg and "['customer_id', 'prompt', 'completion', 'split']" in msg


def test_task_field_with_a_single_value(tmp_path):
    msg = _error(tmp_path, sizes={"solo": 4})
    assert "single value 'solo'" in msg and "tasks:" in msg


def test_task_field_with_no_value(tmp_path):
    path = tmp_path / "chats.parquet"
    pd.DataFrame({"customer_id": [None, ""], "prompt": ["a", "b"], "completion": ["c", "d"]}).to_parquet(path)
    with pytest.raises(TaskDataError, match=r"'customers'.*no value \(all 2 rows are null or empty\)"):
        build_task_data([], bytes_tokenizer(), 16, task_sets=[_set(str(path))])


def test_two_values_with_one_task_name(tmp_path):
    msg = _error(tmp_path, sizes={"a b": 3, "a/b": 3, "c": 3})
    assert "'a b' and 'a/b'" in msg and "'a_b'" in msg and "rename one" in msg


def test_values_that_differ_only_in_case(tmp_path):
    assert "ignoring case" in _error(tmp_path, sizes={"Acme": 3, "acme": 3})


def test_no_task_reaches_min_examples(tmp_path):
    assert "lower min_examples" in _error(tmp_path, min_examples=100)


def test_eval_split_column_missing(tmp_path):
    msg = _error(tmp_path, eval_split={"field": "fold", "value": 1})
    assert "no column 'fold'" in msg and "eval_split.field" in msg


def test_spec_needs_one_way_to_split():
    src = {"kind": "files", "path": "a.parquet"}
    with pytest.raises(ValidationError, match="either task_field"):
        TaskSetSpec(name="s", source=src)
    with pytest.raises(ValidationError, match="either task_field"):
        TaskSetSpec(name="s", source=src, task_field="c", task_per_file=True)
    with pytest.raises(ValidationError, match="task_per_file needs"):
        TaskSetSpec(name="s", source={"kind": "hub", "name": "x"}, task_per_file=True)
    with pytest.raises(ValidationError, match="Extra inputs"):
        TaskSetSpec(name="s", source=src, task_field="c", per_task_cap=3)

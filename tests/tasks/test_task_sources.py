"""Local files of every format load into the same documents; each bad input gets its clear error."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pyarrow as pa
import pytest

from tasks.errors import TaskDataError
from tasks.sources import infer_format, load_documents
from tasks.spec import FilesSource, HubSource

TEXTS = ["first doc\nwith a newline", "second, with a comma", "third \"quoted\" é ü 🙂", "fourth"]


def _texts(ds) -> list[str]:
    return ds.with_format("arrow")[:]["text"].to_pylist()


def _write(tmp_path, fmt: str, texts=TEXTS, field: str = "body") -> str:
    df = pd.DataFrame({field: texts, "id": range(len(texts))})
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")), encoding="utf-8")
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(df.to_dict("records")), encoding="utf-8")
    elif fmt == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in df.to_dict("records")).encode()))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        df.to_parquet(path)
    elif fmt == "arrow":
        path = tmp_path / "d.arrow"
        table = pa.Table.from_pandas(df, preserve_index=False)
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "jsonl.gz", "csv", "parquet", "arrow"])
def test_every_format_loads_the_same_documents(tmp_path, fmt):
    ds = load_documents(FilesSource(path=_write(tmp_path, fmt), text_field="body"), task="t")
    assert ds.column_names == ["text"]
    assert _texts(ds) == TEXTS


def test_explicit_format_overrides_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    assert _texts(load_documents(FilesSource(path=str(path), format="jsonl"), task="t")) == TEXTS


def test_glob_and_list_keep_file_order(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n", encoding="utf-8")
    globbed = load_documents(FilesSource(path=str(tmp_path / "part*.jsonl")), task="t")
    assert _texts(globbed) == ["doc 0", "doc 1", "doc 2"]
    listed = load_documents(FilesSource(path=[str(tmp_path / "part2.jsonl"), str(tmp_path / "part0.jsonl")]), task="t")
    assert _texts(listed) == ["doc 2", "doc 0"]


def test_empty_rows_are_dropped(tmp_path):
    path = _write(tmp_path, "parquet", texts=["a", "", None, "b"], field="text")
    assert _texts(load_documents(FilesSource(path=path), task="t")) == ["a", "b"]


def test_infer_format():
    assert infer_format("x/a.JSONL") == "jsonl"
    assert infer_format("a.parquet") == "parquet"
    assert infer_format("a.csv.zst") == "csv"
    with pytest.raises(TaskDataError, match="cannot tell the format"):
        infer_format("a.txt")


def _error(source, task="mytask") -> str:
    with pytest.raises(TaskDataError) as info:
        load_documents(source, task=task)
    msg = str(info.value)
    assert f"task {task!r}" in msg
    return msg


def test_missing_file(tmp_path):
    msg = _error(FilesSource(path=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_glob_without_match(tmp_path):
    assert "no file matches" in _error(FilesSource(path=str(tmp_path / "*.jsonl")))


def test_directory_instead_of_file(tmp_path):
    assert "is a directory" in _error(FilesSource(path=str(tmp_path)))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    msg = _error(FilesSource(path=str(tmp_path / "e.jsonl")))
    assert "e.jsonl" in msg and "is empty" in msg


def test_zero_rows(tmp_path):
    (tmp_path / "h.csv").write_text("text\n", encoding="utf-8")
    msg = _error(FilesSource(path=str(tmp_path / "h.csv")))
    assert "h.csv" in msg and "no rows" in msg


def test_only_empty_texts(tmp_path):
    path = _write(tmp_path, "jsonl", texts=["", ""], field="text")
    assert "no non-empty 'text' rows" in _error(FilesSource(path=path))


def test_missing_text_column_lists_columns(tmp_path):
    msg = _error(FilesSource(path=_write(tmp_path, "parquet"), text_field="content"))
    assert "no column 'content'" in msg and "['body', 'id']" in msg


def test_non_text_column(tmp_path):
    assert "not text" in _error(FilesSource(path=_write(tmp_path, "parquet"), text_field="id"))


@pytest.mark.parametrize(
    "name, data", [("l.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), ("l.csv", b"text\nok\ncaf\xe9\n")]
)
def test_not_utf8(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    msg = _error(FilesSource(path=str(tmp_path / name)))
    assert name in msg and "not UTF-8" in msg and f"offset {data.index(0xE9)}" in msg


def test_unknown_suffix(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    msg = _error(FilesSource(path=str(tmp_path / "notes.txt")))
    assert "notes.txt" in msg and "source.format" in msg


def test_mixed_formats(tmp_path):
    paths = [_write(tmp_path, "jsonl"), _write(tmp_path, "csv")]
    assert "mixes formats" in _error(FilesSource(path=paths))


def test_malformed_json(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    msg = _error(FilesSource(path=str(tmp_path / "bad.jsonl")))
    assert "bad.jsonl" in msg and "cannot read" in msg


def test_unreachable_hub_dataset(tmp_path):
    msg = _error(HubSource(name=str(tmp_path / "no-such-dataset")))
    assert "no-such-dataset" in msg and "kind: files" in msg

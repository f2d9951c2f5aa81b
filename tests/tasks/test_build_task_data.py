"""build_task_data end to end (byte tokenizer: token ids are the text's bytes, EOS = 256)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import TaskData, TaskSpec, build_task_data
from tasks.errors import TaskDataError
from tasks.tokenizer import bytes_tokenizer

EOS = 256
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _letter_docs(n: int = 40, length: int = 50) -> list[str]:
    """Document i is one distinct letter repeated: any token tells which document it came from."""
    return [LETTERS[i] * length for i in range(n)]


def _stream_rows(texts: list[str], seq_len: int) -> np.ndarray:
    stream = [t for text in texts for t in [*text.encode("utf-8"), EOS]]
    rows = len(stream) // seq_len
    return np.asarray(stream[: rows * seq_len]).reshape(rows, seq_len)


def _letters_in(ids: torch.Tensor) -> set[str]:
    return {chr(int(t)) for t in ids.unique() if int(t) != EOS}


def test_split_is_document_disjoint_and_rows_are_exact(tmp_path):
    texts = _letter_docs()
    spec = TaskSpec(
        name="letters", source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", texts)}, eval_fraction=0.25
    )
    (data,) = build_task_data([spec], bytes_tokenizer(), seq_len=16, seed=0)
    assert isinstance(data, TaskData) and data.name == "letters"
    assert data.train_ids.dtype == torch.long and data.train_ids.shape == (data.train_examples, 16)
    assert data.eval_ids.shape[1] == 16 and data.eval_examples > 0
    train_letters, eval_letters = _letters_in(data.train_ids), _letters_in(data.eval_ids)
    assert not train_letters & eval_letters  # no eval document leaks into training
    assert train_letters | eval_letters == set(LETTERS[:40])
    assert 0.25 <= len(eval_letters) / 40 < 0.3  # equal-length documents: 10 of 40 held out
    # rows are exactly the packed streams of each side's documents, in file order
    train_docs = [t for t in texts if t[0] in train_letters]
    eval_docs = [t for t in texts if t[0] in eval_letters]
    np.testing.assert_array_equal(data.train_ids.numpy(), _stream_rows(train_docs, 16))
    np.testing.assert_array_equal(data.eval_ids.numpy(), _stream_rows(eval_docs, 16))
    np.testing.assert_array_equal(data.train.with_format("numpy")[:]["input_ids"], data.train_ids.numpy())
    np.testing.assert_array_equal(data.eval.with_format("numpy")[:]["input_ids"], data.eval_ids.numpy())


def test_same_seed_same_data_other_seed_other_split(tmp_path):
    spec = TaskSpec(
        name="t", source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", _letter_docs())}, eval_fraction=0.25
    )
    a, b = build_task_data([spec], "bytes", 16, seed=5)[0], build_task_data([spec], "bytes", 16, seed=5)[0]
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.eval_ids, b.eval_ids)
    c = build_task_data([spec], "bytes", 16, seed=6)[0]
    assert _letters_in(c.eval_ids) != _letters_in(a.eval_ids)


def test_eval_source_and_caps(tmp_path):
    train_texts, eval_texts = _letter_docs(26), [c * 50 for c in LETTERS[26:]]
    spec = TaskSpec(
        name="t",
        source={"kind": "files", "path": _jsonl(tmp_path / "train.jsonl", train_texts)},
        eval_source={"kind": "files", "path": _jsonl(tmp_path / "eval.jsonl", eval_texts)},
        max_train_sequences=7,
        max_eval_sequences=5,
    )
    (data,) = build_task_data([spec], bytes_tokenizer(), seq_len=16, seed=0)
    full_train, full_eval = _stream_rows(train_texts, 16), _stream_rows(eval_texts, 16)
    assert data.train_examples == 7 and data.eval_examples == 5
    # a capped set is a subset of the full packed rows, kept in stream order
    pos = [int(np.flatnonzero((full_train == r).all(1))[0]) for r in data.train_ids.numpy()]
    assert pos == sorted(set(pos))
    assert all((full_eval == r).all(1).any() for r in data.eval_ids.numpy())
    assert _letters_in(data.eval_ids) <= set(LETTERS[26:])


def test_several_tasks_keep_their_order_and_own_data(tmp_path):
    specs = [
        TaskSpec(
            name=f"t{i}",
            source={"kind": "files", "path": _jsonl(tmp_path / f"{i}.jsonl", [LETTERS[i] * 300, LETTERS[i] * 200])},
        )
        for i in range(3)
    ]
    data = build_task_data(specs, bytes_tokenizer(), seq_len=32)
    assert [d.name for d in data] == ["t0", "t1", "t2"]
    for i, d in enumerate(data):
        assert _letters_in(d.train_ids) | _letters_in(d.eval_ids) == {LETTERS[i]}


def _build_error(tmp_path, texts, seq_len=16, **spec_kwargs) -> str:
    spec = TaskSpec(name="small", source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", texts)}, **spec_kwargs)
    with pytest.raises(TaskDataError) as info:
        build_task_data([spec], bytes_tokenizer(), seq_len=seq_len)
    assert "'small'" in str(info.value)
    return str(info.value)


def test_short_training_text_becomes_one_padded_row(tmp_path):
    """A side shorter than one row is padded, not refused; only its real tokens are scored."""
    spec = TaskSpec(
        name="small",
        source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", ["tiny", "x" * 100])},
        eval_fraction=0.9,
    )
    (data,) = build_task_data([spec], bytes_tokenizer(), seq_len=16)
    assert data.train_examples == 1 and data.train_ids.shape == (1, 16)
    # "tiny" + EOS, then EOS padding (the bytes tokenizer has no pad token)
    assert data.train_ids[0].tolist() == [*b"tiny", EOS] + [EOS] * 11
    assert data.train_mask[0].tolist() == [False, True, True, True, True] + [False] * 11
    assert data.train_tokens == 4 and data.stats["train"]["padded"]
    assert data.eval_mask is None and data.eval_examples == 100 // 16  # the long side keeps full rows


def test_short_eval_text_becomes_one_padded_row(tmp_path):
    spec = TaskSpec(name="small", source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", ["x" * 500, "y" * 5])})
    (data,) = build_task_data([spec], bytes_tokenizer(), seq_len=16)
    assert data.train_mask is None and data.train_tokens == data.train_examples * 15
    assert data.eval_ids[0].tolist() == [*b"yyyyy", EOS] + [EOS] * 10
    assert data.eval_mask[0].sum() == 5 and not data.eval_mask[0, 0]
    assert data.stats["format"] == "text" and data.stats["eval"]["padded"]


def test_single_document_needs_eval_source(tmp_path):
    assert "single document" in _build_error(tmp_path, ["x" * 500])


def test_duplicate_task_names(tmp_path):
    spec = TaskSpec(name="a", source={"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", ["x"])})
    with pytest.raises(TaskDataError, match="unique"):
        build_task_data([spec, spec], "bytes", 16)


def test_tasks_never_imports_ray(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["x" * 100, "y" * 100])
    code = (
        "import sys, tasks, tasks.sources, tasks.packing, tasks.builtin.stdlib, tasks.tokenizer\n"
        f"spec = tasks.TaskSpec(name='t', source={{'kind': 'files', 'path': {path!r}}})\n"
        "tasks.build_task_data([spec], 'bytes', 16)\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"

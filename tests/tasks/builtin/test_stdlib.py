"""The builtin stdlib-code suite: files, caps, held-out files, and rows traced back to their files."""

from __future__ import annotations

import numpy as np
import pytest

from tasks import DEMO_EVAL_CAP, DEMO_PACKAGES, DEMO_SIZES, STDLIB_PACKAGES, build_task_data, demo_tasks
from tasks.builtin.stdlib import DEMO_EVAL_FRACTION, package_documents, package_files, stdlib_root
from tasks.packing import hold_out
from tasks.tokenizer import bytes_tokenizer

EOS = 256
SEQ_LEN = 128


@pytest.fixture(scope="module")
def demo_data():
    return build_task_data(demo_tasks(), bytes_tokenizer(), seq_len=SEQ_LEN, seed=0)


@pytest.mark.parametrize("package", STDLIB_PACKAGES)
def test_package_files(package):
    files = package_files(package)
    assert files and all(f.suffix == ".py" and f.parts[0] == package for f in files)
    assert not any(p in ("test", "tests") for f in files for p in f.parts)
    assert not any(f.name.startswith("test_") for f in files)
    assert (stdlib_root() / files[0]).is_file()


def test_package_documents_are_the_files():
    docs = package_documents("json")
    keys = docs["doc_key"]
    assert list(keys) == [f.as_posix() for f in package_files("json") if (stdlib_root() / f).read_text().strip()]
    assert docs[1]["text"] == (stdlib_root() / keys[1]).read_text(encoding="utf-8")


def test_demo_sizes_span_ten_fold():
    assert list(DEMO_SIZES) == list(DEMO_PACKAGES) == ["json", "concurrent", "logging", "http", "email", "asyncio"]
    assert max(DEMO_SIZES.values()) / min(DEMO_SIZES.values()) >= 10
    specs = demo_tasks()
    assert [(t.name, t.max_train_sequences, t.max_eval_sequences) for t in specs] == [
        (p, n, DEMO_EVAL_CAP) for p, n in DEMO_SIZES.items()
    ]
    extra = demo_tasks(["xml"], eval_cap=None)[0]
    assert extra.source.package == "xml" and extra.max_train_sequences is None and extra.max_eval_sequences is None


def test_demo_data_is_capped(demo_data):
    assert [d.name for d in demo_data] == list(DEMO_PACKAGES)
    for d in demo_data:
        assert d.train_examples == DEMO_SIZES[d.name] == d.train_ids.shape[0]
        assert 0 < d.eval_examples <= DEMO_EVAL_CAP
        assert d.train_ids.shape[1] == d.eval_ids.shape[1] == SEQ_LEN


def test_eval_files_disjoint_from_train_files():
    for package in DEMO_PACKAGES:
        docs = package_documents(package)
        train, ev = hold_out(docs, DEMO_EVAL_FRACTION, seed=0)
        train_files, eval_files = {docs[int(i)]["doc_key"] for i in train}, {docs[int(i)]["doc_key"] for i in ev}
        assert train_files and eval_files and not train_files & eval_files
        assert train_files | eval_files == set(docs["doc_key"])


def _segments(row: np.ndarray) -> list[str]:
    """The text pieces of a packed row (split at EOS), as UTF-8 with cut characters replaced."""
    cuts = np.flatnonzero(row == EOS)
    pieces = np.split(row, cuts)
    return [bytes(p[p != EOS].astype(np.uint8)).decode("utf-8", errors="ignore") for p in pieces]


@pytest.mark.parametrize("package", ["json", "logging"])
def test_rows_come_from_their_side_of_the_split(demo_data, package):
    """Every text piece of an eval row lies in a held-out file, of a train row in a train file."""
    data = next(d for d in demo_data if d.name == package)
    docs = package_documents(package)
    train, ev = hold_out(docs, DEMO_EVAL_FRACTION, seed=0)
    for ids, side in ((data.eval_ids, ev), (data.train_ids, train)):
        texts = [docs[int(i)]["text"] for i in side]
        for row in ids.numpy():
            for piece in _segments(row):
                core = piece[1:-1]  # a cut multi-byte character may lose a byte at either end
                assert any(core in t for t in texts), f"{package}: {core[:60]!r} not from its split's files"

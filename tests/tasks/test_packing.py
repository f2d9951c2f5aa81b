"""Hold-out, tokenising and packing against plain-Python reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from tasks.packing import cap_rows, hold_out, pack_rows, rows_dataset, tokenize_documents
from tasks.tokenizer import bytes_tokenizer

EOS = 256


def _docs(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"text": [f"doc{i}:" + "x" * int(rng.integers(1, 40)) for i in range(n)]})


def _reference_rows(texts: list[str], seq_len: int) -> np.ndarray:
    """Bytes of each document + EOS, concatenated, cut into full rows (the packing contract)."""
    stream = [t for text in texts for t in [*text.encode("utf-8"), EOS]]
    rows = len(stream) // seq_len
    return np.asarray(stream[: rows * seq_len], dtype=np.int32).reshape(rows, seq_len)


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_pack_rows_matches_reference(seq_len):
    docs = _docs(50)
    tokens = tokenize_documents(docs, bytes_tokenizer())
    idx = np.array([0, 3, 4, 10, 11, 12, 40, 49])
    rows = pack_rows(tokens, idx, seq_len, EOS)
    texts = docs.select(idx)["text"]
    expected = _reference_rows(list(texts), seq_len)
    assert rows.shape == expected.shape and rows.shape[1] == seq_len
    np.testing.assert_array_equal(rows, expected)


def test_pack_rows_drops_only_the_short_tail():
    docs = Dataset.from_dict({"text": ["abc", "de"]})  # stream: a b c EOS d e EOS (7 tokens)
    tokens = tokenize_documents(docs, bytes_tokenizer())
    np.testing.assert_array_equal(pack_rows(tokens, np.arange(2), 3, EOS), [[97, 98, 99], [EOS, 100, 101]])
    assert pack_rows(tokens, np.arange(2), 8, EOS).shape == (0, 8)


def test_special_token_text_is_not_an_eos():
    tokens = tokenize_documents(Dataset.from_dict({"text": ["a<|endoftext|>b"]}), bytes_tokenizer())
    ids = tokens[0]["input_ids"]
    assert EOS not in ids and ids == list(b"a<|endoftext|>b")


def test_hold_out_is_deterministic_disjoint_and_sized():
    docs = _docs(200)
    chars = np.array([len(t) for t in docs["text"]])
    train, ev = hold_out(docs, 0.25, seed=3)
    train2, ev2 = hold_out(docs, 0.25, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(ev, ev2)
    assert not set(train) & set(ev) and sorted([*train, *ev]) == list(range(200))
    share = chars[ev].sum() / chars.sum()
    assert 0.25 <= share < 0.25 + chars.max() / chars.sum()  # the fewest documents that reach 25%
    other = hold_out(docs, 0.25, seed=4)[1]
    assert set(other) != set(ev)


def test_hold_out_by_key_ignores_row_order():
    keys = [f"pkg/file{i}.py" for i in range(30)]
    docs = Dataset.from_dict({"text": [k * 3 for k in keys], "doc_key": keys})
    shuffled = docs.select(np.random.default_rng(0).permutation(30))
    held = {docs[int(i)]["doc_key"] for i in hold_out(docs, 0.3, seed=0)[1]}
    held_shuffled = {shuffled[int(i)]["doc_key"] for i in hold_out(shuffled, 0.3, seed=0)[1]}
    assert held == held_shuffled


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_hold_out_keeps_both_sides_non_empty(fraction):
    train, ev = hold_out(_docs(3), fraction, seed=0)
    assert len(train) >= 1 and len(ev) >= 1 and len(train) + len(ev) == 3


def test_cap_rows_is_a_deterministic_ordered_subset():
    rows = np.arange(100 * 4, dtype=np.int32).reshape(100, 4)
    a = cap_rows(rows, 10, seed=0, salt="task:train")
    np.testing.assert_array_equal(a, cap_rows(rows, 10, seed=0, salt="task:train"))
    assert a.shape == (10, 4) and (np.diff(a[:, 0]) > 0).all()  # kept in stream order, no repeats
    assert set(a[:, 0]) <= set(rows[:, 0])
    assert not np.array_equal(a, cap_rows(rows, 10, seed=1, salt="task:train"))
    assert not np.array_equal(a, cap_rows(rows, 10, seed=0, salt="other:train"))
    assert cap_rows(rows, None, 0, "t") is rows and cap_rows(rows, 500, 0, "t") is rows


def test_rows_dataset_is_fixed_length():
    rows = np.arange(12, dtype=np.int32).reshape(3, 4)
    ds = rows_dataset(rows)
    assert str(ds.data.schema.field("input_ids").type) == "fixed_size_list<item: int32>[4]"
    np.testing.assert_array_equal(ds.with_format("numpy")[:]["input_ids"], rows)

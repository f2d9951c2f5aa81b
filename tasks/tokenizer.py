"""Tokenizers: a hub id or local directory, a GGUF file (cached once converted), or ``bytes``.

* ``bytes`` is built offline: token id ``b`` is the byte ``b`` (0-255) and id 256 is
  ``<|endoftext|>`` (vocab 257). It suits the tiny random-init test models and any text.
* A GGUF file (the builtin ``smollm2-135m`` included) carries its tokenizer; converting it
  takes ~7 s, so the result is saved once under ``model_cache_dir()/tokenizers`` and later
  loads take ~0.2 s.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from models.base import BaseModelError, model_cache_dir, resolve_model
from models.files import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BYTES_TOKENIZER", "BYTES_EOS", "TokenizerError", "load_tokenizer", "bytes_tokenizer"]

BYTES_TOKENIZER = "bytes"
BYTES_EOS = "<|endoftext|>"


class TokenizerError(BaseModelError):
    """The base model's tokenizer cannot be found or loaded; the message says what to do."""


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (ByteLevel's alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@lru_cache(maxsize=1)
def _bytes_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # A BPE with no merges over the byte alphabet: every byte is one token, id = byte value.
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTES_EOS])  # id 256
    return tok.to_str()


def bytes_tokenizer() -> PreTrainedTokenizerBase:
    """The offline byte-level tokenizer: ``ids == list(text.encode("utf-8"))``, EOS = 256.

    Example:
        >>> tok = bytes_tokenizer()
        >>> tok("hé", add_special_tokens=False)["input_ids"]
        [104, 195, 169]
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bytes_tokenizer_json()),
        eos_token=BYTES_EOS,
        model_max_length=1 << 30,  # packing cuts rows itself; silence "sequence too long"
    )
    tok.name_or_path = BYTES_TOKENIZER
    return tok


def _gguf_tokenizer(directory: str, gguf_file: str) -> PreTrainedTokenizerBase:
    """Convert a GGUF's tokenizer once; reuse the saved ``tokenizer.json`` afterwards."""
    from transformers import AutoTokenizer

    src = Path(directory) / gguf_file
    if not src.is_file():
        raise TokenizerError(f"GGUF file {str(src)!r} not found: check base.name / base.gguf_file")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = model_cache_dir() / "tokenizers" / f"{src.stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    try:
        with atomic_dir(cached) as tmp:
            tok.save_pretrained(str(tmp))
    except OSError:
        pass  # a read-only cache or a concurrent writer: the converted tokenizer is still usable
    return tok


def load_tokenizer(name: str | None, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer that matches a base model.

    Args:
        name: ``"bytes"``, a builtin model name (``smollm2-135m``), a hub id, a local
            directory, or a ``.gguf`` file path; ``None`` with ``gguf_file`` = that file.
        gguf_file: GGUF file inside ``name`` (directory or hub repo).

    Raises:
        TokenizerError: nothing loadable under that name (the message says what to give).

    Example:
        >>> load_tokenizer("smollm2-135m").vocab_size
        49152
    """
    if name is None and gguf_file is None:
        raise TokenizerError("no tokenizer named: set base.tokenizer (e.g. 'bytes') or base.name")
    if name == BYTES_TOKENIZER:
        return bytes_tokenizer()
    if name is None:
        name, gguf_file = str(Path(gguf_file).parent), Path(gguf_file).name
    directory, gguf = resolve_model(name, gguf_file)
    if gguf:
        return _gguf_tokenizer(directory, gguf)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(
            f"tokenizer {name!r} could not be loaded ({first}); give a local model directory, a GGUF "
            f"file, a hub id reachable from this machine, or {BYTES_TOKENIZER!r} for tiny test models"
        ) from None

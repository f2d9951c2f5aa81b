"""Shared fixtures: tiny random-init models (fast, offline) and thread limits for 2-core CI."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
)
TINY_GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128)


@pytest.fixture
def tiny_llama():
    from models.base import load_base

    return load_base(random_init=TINY_LLAMA, seed=0)


@pytest.fixture
def tiny_gpt2():
    from models.base import load_base

    return load_base(random_init=TINY_GPT2, seed=0)

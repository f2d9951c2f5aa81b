"""LQ decomposition, QuantizedLinear, quantize_model composed with multi-task LoRA, Fisher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.base import load_base
from models.lora import adapter_params, inject, lora_layers, set_trainable, task_ids
from models.quant.linear import QuantizedLinear
from models.quant.lq import QuantTargetError, lq_decompose
from models.quant.model import fisher_diag, quantizable_matrices, quantize_model
from models.quant.quantizers import quantize
from models.train.step import Batch, train_step

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny():
    return load_base(random_init=TINY, seed=0)


def ids(n=3, length=12, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def structured(out=96, inp=128, seed=0) -> torch.Tensor:
    """Gaussian weights plus a few strong low-rank directions (outlier features)."""
    g = torch.Generator().manual_seed(seed)
    return (
        0.02 * torch.randn(out, inp, generator=g)
        + 0.2 * torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g) / 4
    )


@pytest.mark.parametrize("method", ["nf", "uniform", "vq"])
def test_lq_kept_error_never_rises_and_beats_plain(method):
    w = structured()
    q, l1, l2, hist, best = lq_decompose(w, bits=2, rank=8, quantizer=method, iters=6)
    kept = float((w - q.dequantize() - l1 @ l2.T).norm())
    assert kept == pytest.approx(hist[best], rel=1e-5) and hist[best] == min(hist)
    assert best >= 1 and hist[best] < 0.8 * hist[0]  # LQ beats plain quant at the same bits
    plain = quantize(w, method, 2)
    assert float((w - plain.dequantize()).norm()) == pytest.approx(hist[0], rel=1e-5)
    assert l1.shape == (96, 8) and l2.shape == (128, 8)


def test_lq_more_rounds_help_at_low_bits():
    w = structured()
    one = lq_decompose(w, 2, 8, "nf", iters=1)
    many = lq_decompose(w, 2, 8, "nf", iters=8)
    assert many.history[many.best] <= one.history[one.best]
    assert len(one.history) == 2


def test_lq_fisher_weighted_error_and_rank_zero():
    w = structured()
    fisher = torch.rand(96, 1, generator=torch.Generator().manual_seed(1)) @ torch.rand(1, 128) + 1e-3
    dec = lq_decompose(w, 3, 8, "nf", iters=4, fisher=fisher)
    resid = w - dec.Q.dequantize() - dec.L1 @ dec.L2.T
    assert float((fisher * resid**2).sum().sqrt()) == pytest.approx(dec.history[dec.best], rel=1e-4)
    assert dec.history[dec.best] < dec.history[0]
    plain = lq_decompose(w, 3, 0, "nf")
    assert plain.best == 0 and plain.L1.shape == (96, 0)
    with pytest.raises(QuantTargetError, match="rank=500"):
        lq_decompose(w, 3, 500)


def test_quantized_linear_forward_is_linear_of_dequantised_weight():
    lin = nn.Linear(64, 48)
    packed = quantize(lin.weight, "nf", 3)
    layer = QuantizedLinear(packed, lin.bias)
    x = torch.randn(2, 5, 64)
    assert torch.allclose(layer(x), F.linear(x, packed.dequantize(), lin.bias), atol=1e-6)
    big = [
        t for t in list(layer.buffers()) + list(layer.parameters()) if t.is_floating_point() and t.numel() >= 64 * 48
    ]
    assert not big, "no full-precision copy of the weight may be stored"
    assert layer._cached is None and layer.nbytes == packed.nbytes


def test_quantize_model_all_linear_matches_dequantised_reference():
    model, ref = tiny(), tiny()
    report = quantize_model(model, "all-linear", bits=4)
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(qlayers) == 14 and isinstance(model.lm_head, nn.Linear)
    for n in qlayers:  # reference: same weights, dequantised independently
        ref.get_submodule(n).weight.data.copy_(quantize(ref.get_submodule(n).weight, "nf", 4).dequantize())
    x = ids()
    assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)
    assert report.stored_bytes == sum(m.nbytes for m in qlayers.values())
    assert 4.2 < 8 * report.stored_bytes / report.numel < 4.4
    with pytest.raises(QuantTargetError, match="already quantised"):
        quantizable_matrices(model)


def test_lq_init_of_lora_reproduces_q_plus_low_rank():
    model, ref = tiny(), tiny()
    inject(model, PROJ, num_tasks=3, rank=4, alpha=8.0, layers=[1])
    orig = {n: ref.get_submodule(n).weight.detach().clone() for n in lora_layers(model)}
    report = quantize_model(model, PROJ, bits=2, layers=[1], iters=3)
    assert {r["name"] for r in report.rows} == set(orig) and all(r["rank"] == 4 for r in report.rows)
    for n, w in orig.items():  # reference model: W_hat = Q + L1 L2^T computed independently
        dec = lq_decompose(w, 2, 4, "nf", 3)
        ref.get_submodule(n).weight.data.copy_(dec.Q.dequantize() + dec.L1 @ dec.L2.T)
        layer = lora_layers(model)[n]
        assert isinstance(layer.base_layer, QuantizedLinear)
        assert torch.allclose(layer.lora_A_shared.data, dec.L2.T, atol=1e-6)
    x = ids()
    with task_ids(model, torch.tensor([0, 1, 2])):  # per-task offsets are zero: shared start
        got = model(input_ids=x).logits
    assert torch.allclose(got, ref(input_ids=x).logits, atol=1e-4)
    # and LQ's reconstruction is closer to W than plain 2-bit quantisation
    assert all(r["rel_error"] < r["rel_error_q_only"] for r in report.rows)


def test_adapters_train_on_quantised_base_and_codes_stay_frozen():
    model = tiny()
    inject(model, ["q_proj", "v_proj"], num_tasks=2, rank=4, alpha=8.0)
    quantize_model(model, ["q_proj", "v_proj"], bits=3)
    set_trainable(model, shared=True, task=True)
    params = [p for p in adapter_params(model) if p.requires_grad]
    codes = {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = Batch(ids(4), torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.25))
    res = train_step(model, batch, opt, params)
    assert res.grad_norm > 0 and any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(codes[n], b) for n, b in model.named_buffers() if n.endswith("codes"))


def test_allocation_dict_and_errors():
    model = tiny()
    names = list(quantizable_matrices(model, ["q_proj", "down_proj"]))
    alloc = {n: ("uniform", 8) if "q_proj" in n else ("vq", 2) for n in names}
    report = quantize_model(model, ["q_proj", "down_proj"], bits=alloc)
    assert {(r["quantizer"], r["bits"]) for r in report.rows} == {("uniform", 8), ("vq", 2)}
    with pytest.raises(QuantTargetError, match="match no linear layer"):
        quantize_model(tiny(), ["nope_proj"], bits=4)
    with pytest.raises(QuantTargetError, match="no entry"):
        quantize_model(tiny(), ["q_proj", "v_proj"], bits={names[0]: ("nf", 4)})


def test_fisher_diag_equals_squared_gradients():
    model = tiny()
    x1, x2 = ids(2, seed=1), ids(2, seed=2)
    fis = fisher_diag(model, [x1, x2], ["q_proj", "down_proj"], layers=[0])
    assert set(fis) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    ref = copy.deepcopy(model)
    w = ref.model.layers[0].self_attn.q_proj.weight
    w.requires_grad_(True)
    total = torch.zeros_like(w)
    for x in (x1, x2):
        logits = ref(input_ids=x).logits[:, :-1]
        g, = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 300), x[:, 1:].reshape(-1)), w)
        total += g**2
    assert torch.allclose(fis["model.layers.0.self_attn.q_proj"], total / 2, rtol=1e-4, atol=1e-12)
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    # the Fisher feeds the weighted decomposition of the same matrices
    report = quantize_model(model, ["q_proj", "down_proj"], bits=3, layers=[0], fisher=fis)
    assert len(report.rows) == 2


def test_gpt2_conv1d_layers_quantise_in_linear_layout():
    cfg = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64}
    model, ref = load_base(random_init=cfg, seed=0), load_base(random_init=cfg, seed=0)
    fis = fisher_diag(model, [ids(2)], ["c_attn", "c_fc"])
    assert fis["transformer.h.0.attn.c_attn"].shape == (192, 64)  # (out, in), not Conv1D's (in, out)
    quantize_model(model, ["c_attn", "c_fc"], bits=4, quantizer="uniform")
    for n in fis:
        conv = ref.get_submodule(n)
        conv.weight.data.copy_(quantize(conv.weight.T, "uniform", 4).dequantize().T)
    x = ids()
    assert torch.allclose(model(input_ids=x).logits, ref(input_ids=x).logits, atol=1e-5)

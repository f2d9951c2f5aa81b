"""The model-side GPU paths on CUDA, each against a CPU reference (skipped without CUDA)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from models.base import load_base
from models.lora import adapter_params, inject
from models.moe import convert_to_moe, moe_params
from models.precision import cast_frozen
from models.quant.linear import QuantizedLinear
from models.quant.quantizers import quantize
from models.train.step import Batch, row_nll, row_nll_sum
from tests.conftest import TINY_LLAMA
from tests.gpu.conftest import DEVICE as DEV

PROJ = ["q_proj", "v_proj", "down_proj"]


def _pair(build):
    """(CPU fp32 model, CUDA bf16-base model) with the same adapters, and their trainable params."""
    out = []
    for device, dtype in (("cpu", torch.float32), (DEV, torch.bfloat16)):
        torch.manual_seed(0)
        m = load_base(random_init=TINY_LLAMA, seed=0)
        params = build(m)
        with torch.no_grad():
            for p in params:
                if p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        cast_frozen(m, dtype)
        out.append((m.to(device), params))
    return out


def _batch(device):
    g = torch.Generator().manual_seed(3)
    return Batch(torch.randint(0, 300, (6, 24), generator=g), torch.tensor([0, 1, 1, 0, 1, 0]),
                 torch.full((6,), 1 / 6)).to(device)


def _compare(build):
    (cpu, cpu_params), (gpu, gpu_params) = _pair(build)
    res = []
    for model, device in ((cpu, "cpu"), (gpu, DEV)):
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        loss = (_batch(device).weights * row_nll(model, _batch(device))).sum()
        loss.backward()
        res.append((float(loss.detach()), [p.grad.detach().float().cpu() for p in params], params))
    (l_cpu, g_cpu, _), (l_gpu, g_gpu, p_gpu) = res
    assert l_gpu == pytest.approx(l_cpu, rel=2e-2)
    assert all(p.dtype == torch.float32 and p.device.type == torch.device(DEV).type for p in p_gpu)
    for a, b in zip(g_gpu, g_cpu, strict=True):
        if b.abs().sum() > 0:
            assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95  # bf16 base (+ TF32 on a GPU)


def test_batched_lora_on_cuda_matches_cpu():
    _compare(lambda m: (inject(m, PROJ, num_tasks=2, rank=4, alpha=8.0), adapter_params(m))[1])


def test_pesc_experts_on_cuda_match_cpu():
    def build(m):
        inject(m, PROJ, num_tasks=2, rank=4, alpha=8.0)
        convert_to_moe(m, num_experts=4, top_k=2, bottleneck=8)
        return adapter_params(m) + moe_params(m)

    _compare(build)


@pytest.mark.parametrize("method", ["nf", "uniform", "vq"])
def test_quantised_layer_on_cuda_matches_cpu_and_frees_its_weight(method):
    w = 0.05 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    layer = QuantizedLinear(quantize(w, method, 4))
    x = torch.randn(4, 64, 512, generator=torch.Generator().manual_seed(1))
    ref = layer(x)
    gpu = QuantizedLinear(quantize(w, method, 4)).to(DEV)
    xg = x.to(DEV).clone().requires_grad_(True)
    torch.testing.assert_close(gpu(xg).cpu(), ref, rtol=1e-4, atol=1e-4)
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    y = gpu(xg)
    if DEV.startswith("cuda"):
        held = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        assert held < w.numel() * 4  # the dequantised fp32 weight is not kept for backward
    y.sum().backward()
    xc = x.detach().clone().requires_grad_(True)
    F.linear(xc, layer.dequantized_weight()).sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)


def test_chunked_loss_on_cuda_matches_cpu():
    (cpu, _), (gpu, _) = _pair(lambda m: (inject(m, PROJ, num_tasks=2, rank=4, alpha=8.0), adapter_params(m))[1])
    with torch.no_grad():
        a, _ = row_nll_sum(cpu, _batch("cpu"))
        b, _ = row_nll_sum(gpu, _batch(DEV), chunk_tokens=17)
    torch.testing.assert_close(b.cpu(), a, rtol=2e-2, atol=2e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flock_loop_on_a_world_size_one_nccl_group(monkeypatch):
    """The flock's per-worker loop with real NCCL collectives (Theta's gradient, clip norm, failure flags,
    tau statistics): NCCL refuses a CPU tensor, so a collective fed from host memory fails here."""
    import torch.distributed as dist

    import models.train.loop as loop
    from models.prior import HierarchicalPrior
    from models.train.loop import train_method
    from tests.models.train.test_loop import SIZES, _cfg, _data, _model

    def run(device):
        m, init = _model(4)
        cast_frozen(m, torch.bfloat16 if device == DEV else torch.float32)
        m = m.to(device)
        init = {k: v.to(device) for k, v in init.items()}
        data = _data([0, 1, 2, 3])
        data.train = {k: v.to(device) for k, v in data.train.items()}
        data.eval = {k: v.to(device) for k, v in data.eval.items()}
        prior = HierarchicalPrior(m, SIZES, mode="infer", tau_init=100.0, update_every=2, a=1.0, b=0.01,
                                  owned_tasks=[0, 1, 2, 3])
        return train_method(m, data, _cfg("hierarchical", steps=6), init, prior=prior, log=lambda s: None,
                            device=device)

    ref = run("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    if DEV.startswith("cuda"):
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device(DEV, 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(loop, "_distributed", lambda: True)  # world size 1 would skip every collective
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.device.type), real(t, *a, **k))[1])
    try:
        out = run(DEV)
    finally:
        dist.destroy_process_group()
    assert calls and set(calls) == {torch.device(DEV).type}
    for t, v in ref["eval_nll"].items():
        assert out["eval_nll"][t] == pytest.approx(v, rel=3e-2)
    assert out["failed"] == {}


def test_load_job_base_on_cuda_is_bf16_with_tf32_on():
    from orchestrator.base.load import load_job_base
    from tests.orchestrator.conftest import tiny_job_spec

    if not DEV.startswith("cuda"):
        pytest.skip("CUDA only: on the CPU the base stays fp32 and TF32 off")
    torch.set_float32_matmul_precision("highest")
    model = load_job_base(tiny_job_spec(), DEV)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    assert torch.get_float32_matmul_precision() == "high"


def test_pack_host_on_cuda_matches_cpu():
    from orchestrator.search.pack_host import PackHost
    from orchestrator.search.trial import build_payload
    from tests.orchestrator.conftest import tiny_job_spec

    spec = tiny_job_spec(num_layers=3, top_layers=2, steps=4)
    g = torch.Generator().manual_seed(0)
    sizes = [3, 6, 9]
    train = [torch.randint(0, 300, (n, 16), generator=g).numpy() for n in sizes]
    evals = [torch.randint(0, 300, (2, 16), generator=g).numpy() for _ in sizes]
    payload = build_payload(spec.model_dump(mode="json"), ["json", "http", "email"], sizes, train, evals)
    config = {"rank": 4, "tau": 100.0, "lr": 3e-3, "bits": 16, "target_sparsity": 0.0}
    out = {}
    for device in ("cpu", DEV):
        host = PackHost(payload, capacity=2, max_rank=4, device=device)
        a = host.lease(config, spec.train.seed)
        for _ in range(4):
            host.step([a])
        out[device] = host.evaluate(a)
        state = host.state(a)
        assert all(v.dtype == torch.float32 for v in state.values())
    for t, v in out["cpu"].items():
        assert out[DEV][t] == pytest.approx(v, rel=3e-2)

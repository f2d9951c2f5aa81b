"""Eigen-adapter layer: batched routing, PEFT export, Gram-Schmidt, gradients, counts."""

from __future__ import annotations

import pytest
import torch

from models.base import load_base
from models.eigen.layer import (
    EigenLoraLinear,
    coeff_params,
    eigen_layers,
    eigen_params,
    export_peft,
    gram_schmidt_extend,
    inject_eigen,
    lora_params,
)
from models.eigen.subspace import SubspaceError, build_subspace
from models.lora import TaskRouter, inject, linear_dims, lora_layers, task_ids
from tests.conftest import TINY_GPT2, TINY_LLAMA

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "attn.c_attn", "mlp.c_fc")


def _subspace(model, k=3, n_tasks=4, rank=4, seed=0):
    """A subspace built from random 'trained' adapters on every layer's TARGETS."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_modules() if n.endswith(TARGETS)]
    adapters = {}
    for t in range(n_tasks):
        adapters[f"t{t}"] = {}
        for n in names:
            n_in, n_out, _ = linear_dims(model.get_submodule(n))
            adapters[f"t{t}"][n] = (
                torch.randn(rank, n_in, generator=g) * 0.1,
                torch.randn(n_out, rank, generator=g) * 0.1,
            )
    return build_subspace(adapters, k=k)


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in eigen_layers(model).values():
            for p in (layer.coef_A, layer.coef_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_gram_schmidt_directions_are_orthonormal_to_the_basis_and_each_other():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 6, generator=g))[0]
    wide = gram_schmidt_extend(basis, 10, g)
    assert wide.shape == (40, 16)
    assert torch.equal(wide[:, :6], basis)
    torch.testing.assert_close(wide.T @ wide, torch.eye(16), atol=1e-6, rtol=0)
    with pytest.raises(SubspaceError, match="k_extra"):
        gram_schmidt_extend(basis, 35, g)


def test_layer_matches_explicit_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7)
    v_a, v_b = torch.linalg.qr(torch.randn(10, 3))[0], torch.linalg.qr(torch.randn(7, 3))[0]
    layer = EigenLoraLinear(base, v_a, v_b, num_tasks=3, rank=2, alpha=6.0, router=TaskRouter())
    with torch.no_grad():
        layer.coef_A.normal_(), layer.coef_B.normal_()
    x = torch.randn(3, 5, 10)
    layer.router.ids = torch.tensor([2, 0, 1])
    y = layer(x)
    for row, t in enumerate([2, 0, 1]):
        a = (v_a @ layer.coef_A[t]).T  # (r, in)
        b = v_b @ layer.coef_B[t]  # (out, r)
        torch.testing.assert_close(y[row], base(x[row]) + 3.0 * x[row] @ a.T @ b.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k_extra", [0, 2])
def test_batched_forward_equals_loop_of_single_tasks(tiny_llama, k_extra):
    names = inject_eigen(tiny_llama, _subspace(tiny_llama), num_tasks=3, rank=4, alpha=8.0, k_extra=k_extra)
    assert len(names) == 6 and set(eigen_layers(tiny_llama)) == set(names)
    assert {layer.k for layer in eigen_layers(tiny_llama).values()} == {3 + k_extra}
    _randomise(tiny_llama)
    x = torch.randint(0, 300, (5, 9))
    ids = torch.tensor([2, 0, 1, 2, 0])
    with torch.no_grad(), task_ids(tiny_llama, ids):
        batched = tiny_llama(input_ids=x).logits
    for row in range(len(x)):
        with torch.no_grad(), task_ids(tiny_llama, int(ids[row])):
            single = tiny_llama(input_ids=x[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], single, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), task_ids(tiny_llama, torch.tensor([0, 1])):
        two = tiny_llama(input_ids=x[:1].expand(2, -1)).logits
    assert (two[0] - two[1]).abs().max() > 1e-4  # tasks really differ


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_peft_export_gives_the_same_logits(tmp_path, config):
    from peft import PeftModel

    model = load_base(random_init=config, seed=0)
    inject_eigen(model, _subspace(model), num_tasks=2, rank=4, alpha=8.0, k_extra=1)
    _randomise(model)
    x = torch.randint(0, 300, (2, 10))
    for t in (0, 1):
        export_peft(model, t, tmp_path / f"t{t}", "tiny")
        with torch.no_grad(), task_ids(model, t):
            want = model(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(load_base(random_init=config, seed=0), tmp_path / f"t{t}").eval()
        with torch.no_grad():
            got = peft_model(input_ids=x).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    base = load_base(random_init=config, seed=0)
    with torch.no_grad():
        assert (base(input_ids=x).logits - want).abs().max() > 1e-4  # the adapter does something


def test_gradient_reaches_only_the_coefficients_of_the_routed_task(tiny_llama):
    inject_eigen(tiny_llama, _subspace(tiny_llama), num_tasks=3, rank=4, alpha=8.0, k_extra=1)
    _randomise(tiny_llama)
    trainable = [p for p in tiny_llama.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in eigen_params(tiny_llama)}
    x = torch.randint(0, 300, (2, 8))
    with task_ids(tiny_llama, torch.tensor([1, 1])):
        tiny_llama(input_ids=x).logits.square().mean().backward()
    for name, p in tiny_llama.named_parameters():
        assert p.grad is None or name.endswith(("coef_A", "coef_B")), name
    for layer in eigen_layers(tiny_llama).values():
        for p in (layer.coef_A, layer.coef_B):
            assert p.grad[1].abs().sum() > 0 and p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0
        assert not layer.basis_A.requires_grad


def test_shares_the_router_with_lora_layers_and_counts_parameters(tiny_llama):
    sub = _subspace(tiny_llama, k=3)
    inject(tiny_llama, ["o_proj"], num_tasks=2, rank=4, alpha=8.0)
    router = tiny_llama._loraflock_router
    inject_eigen(tiny_llama, sub, num_tasks=2, rank=4, alpha=8.0)
    assert tiny_llama._loraflock_router is router
    assert all(
        layer.router is router for layer in [*eigen_layers(tiny_llama).values(), *lora_layers(tiny_llama).values()]
    )
    assert all(layer.lora_A.requires_grad for layer in lora_layers(tiny_llama).values())  # untouched
    # per task: 2 K r per module vs r (m + n): q (64->64), v (64->32), down (96->64), 2 layers
    assert coeff_params(tiny_llama) == 6 * 2 * 3 * 4
    assert lora_params(tiny_llama) == 2 * 4 * ((64 + 64) + (64 + 32) + (96 + 64))
    with pytest.raises(SubspaceError, match="already carries"):
        inject_eigen(tiny_llama, sub, num_tasks=2, rank=4, alpha=8.0)


def test_a_subspace_of_another_model_is_refused(tiny_gpt2, tiny_llama):
    with pytest.raises(SubspaceError, match="does not have"):
        inject_eigen(tiny_gpt2, _subspace(tiny_llama), num_tasks=1, rank=2, alpha=4.0)


def test_coefficients_train_with_the_shared_train_step(tiny_llama):
    from models.train.step import Batch, train_step

    inject_eigen(tiny_llama, _subspace(tiny_llama, k=4), num_tasks=2, rank=4, alpha=8.0, k_extra=2)
    params = eigen_params(tiny_llama)
    opt = torch.optim.Adam(params, lr=0.05)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1])
    batch = Batch(torch.randint(0, 300, (4, 16), generator=g), ids, torch.full((4,), 0.25))
    losses = [train_step(tiny_llama, batch, opt, params).loss for _ in range(15)]
    assert losses[-1] < losses[0] - 0.1, losses

"""QuantizedLinear's backward re-dequantises (issue 21, item 7): same gradients, no full-size weight saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.quant.linear import QuantizedLinear
from models.quant.quantizers import _grid_on, quantize


def _layer(method: str, bias: bool = True) -> QuantizedLinear:
    g = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(48, 64, generator=g)
    b = 0.1 * torch.randn(48, generator=g) if bias else None
    return QuantizedLinear(quantize(w, method, 4), b)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()``'s output and the bytes of every tensor its autograd graph saves for backward."""
    total = [0]

    def pack(t: torch.Tensor):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, total[0]


@pytest.mark.parametrize("method", ["nf", "uniform", "vq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_the_keep_weight_version(method, dtype):
    layer = _layer(method).to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 5, 48, dtype=dtype)
    (layer(x) * up).sum().backward()
    got = x.grad.clone()
    x.grad = None
    w = layer.dequantized_weight().to(dtype)
    ref_y = F.linear(x, w, layer.bias.to(dtype))
    (ref_y * up).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), ref_y, rtol=0, atol=0)


def test_backward_saves_no_full_size_weight():
    layer = _layer("nf")
    x = torch.randn(2, 4, 64, requires_grad=True)
    weight_bytes = 48 * 64 * 4
    _, old = _saved_bytes(lambda: F.linear(x, layer.dequantized_weight(), layer.bias))
    assert old >= weight_bytes  # the keep-weight version holds the dequantised matrix: the check can fail
    y, new = _saved_bytes(lambda: layer(x))
    assert new < weight_bytes
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_trainable_bias_still_gets_its_gradient():
    layer = _layer("nf")
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 64)
    layer(x).pow(2).sum().backward()
    y = F.linear(x, layer.dequantized_weight(), layer.bias.detach().requires_grad_(True))
    ref = torch.autograd.grad(y.pow(2).sum(), [y])[0].sum((0, 1))
    torch.testing.assert_close(layer.bias.grad, ref)


def test_level_grid_is_copied_to_a_device_once():
    a = _grid_on("nf", 4, torch.device("cpu"))
    assert _grid_on("nf", 4, torch.device("cpu")) is a  # cached: no copy per forward

"""A frozen linear layer stored as packed low-bit codes (the quantised base's layers).

Its own module because everything that builds or reads a quantised base needs the layer
(``models.quant.model`` creates it, ``orchestrator.base.store`` rebuilds it from the
object store) while only some of them need the LQ maths of ``models.quant.lq``.
``models.lora`` and ``models.moe`` recognise it by ``is_quantized_linear`` rather than
importing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.quant.lq import QuantTargetError
from models.quant.quantizers import PackedTensor, packed_shapes

__all__ = ["QuantizedLinear"]


class _DequantLinear(torch.autograd.Function):
    """``y = x Q^T + b`` that saves no weight for backward: it dequantises ``Q`` again there.

    Why: ``F.linear`` on the dequantised matrix keeps that full-size matrix alive in the
    autograd graph until backward, so a quantised base would hold every adapted layer's
    dense weight at once during training (the memory it was quantised to save). The packed
    codes are alive anyway; re-dequantising them costs one cheap elementwise pass per layer
    in backward. Nothing is saved: the layer itself (its packed buffers) is the context.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.has_bias = layer, bias is not None
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        return F.linear(x, layer.dequantized_weight().to(device=x.device, dtype=x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer.dequantized_weight().to(device=ctx.x_device, dtype=grad_y.dtype)
            grad_x = (grad_y @ w).to(ctx.x_dtype)  # the base is frozen: no weight gradient
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_b, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer that holds only packed codes and dequantises per forward.

    ``y = x Q^T + b`` with ``Q = packed.dequantize()``. No fp32 weight is kept, not even
    for backward (which dequantises again: :class:`_DequantLinear`); with
    ``cache_weight=True`` (off by default) the dequantised weight is kept after the first
    forward, trading memory for speed.

    Args:
        packed: the quantised (out, in) weight.
        bias: optional (out,) bias, kept in full precision and frozen.
        cache_weight: keep the dequantised weight between forwards.

    Example:
        >>> layer = QuantizedLinear(quantize(lin.weight, "nf", 4), lin.bias)
    """

    is_quantized_linear = True  # read by models.lora / models.moe (they cannot import this module)

    def __init__(self, packed: PackedTensor, bias: torch.Tensor | None = None, cache_weight: bool = False) -> None:
        super().__init__()
        if len(packed.shape) != 2:
            raise QuantTargetError(f"QuantizedLinear needs a 2-D packed weight, got {packed.shape}")
        self.out_features, self.in_features = packed.shape
        self.method, self.bits, self.block_size = packed.method, packed.bits, packed.block_size
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("codebook", packed.codebook)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cache_weight = cache_weight
        self._cached: torch.Tensor | None = None

    @classmethod
    def skeleton(
        cls, shape: tuple[int, int], method: str, bits: int, block_size: int = 64, bias: bool = False
    ) -> QuantizedLinear:
        """A layer of this format whose tensors live on ``meta`` (no memory), to be pointed at stored arrays.

        ``orchestrator.base.store`` builds workers' models this way: the codes, scales,
        codebook and bias are then replaced by zero-copy views of the object store.
        """
        shapes = packed_shapes(tuple(shape), method, bits, block_size)
        dtypes = {"codes": torch.uint8, "scales": torch.float16, "codebook": torch.float16}
        t = {k: torch.empty(v, dtype=dtypes[k], device="meta") for k, v in shapes.items()}
        packed = PackedTensor(method, bits, tuple(shape), block_size, t["codes"], t["scales"], t["codebook"])
        return cls(packed, torch.empty(shape[0], device="meta") if bias else None)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model but keep the packed format: ``model.to(torch.bfloat16)`` must not
        round the fp16 scales and codebook (only devices change; the bias may change dtype)."""
        keep = {k: self._buffers[k] for k in ("scales", "codebook")}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        self._cached = None
        return self

    @property
    def packed(self) -> PackedTensor:
        shape = (self.out_features, self.in_features)
        return PackedTensor(self.method, self.bits, shape, self.block_size, self.codes, self.scales, self.codebook)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the packed weight (the bias is not counted)."""
        return self.packed.nbytes

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32 weight (from the cache when enabled)."""
        if self._cached is not None:
            return self._cached
        w = self.packed.dequantize()
        if self.cache_weight:
            self._cached = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, self.dequantized_weight().to(device=x.device, dtype=x.dtype), bias)
        return _DequantLinear.apply(x, bias, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.method}{self.bits}, bytes={self.nbytes}"

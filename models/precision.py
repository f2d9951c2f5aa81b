"""Precision on a GPU: a bf16 frozen base, fp32 adapters, TF32 for the fp32 matmuls.

Why this split. The base is frozen, so its weights never accumulate updates: bf16 halves
its memory and its matmuls run at the tensor cores' bf16 rate. The adapters, their AdamW
moments, the prior and Theta are what training changes by small steps; they stay fp32 (the
LoRA layers cast their input to the adapters' dtype and their output back, see
``models.lora.MultiTaskLoraLinear.forward``). Their fp32 matmuls may use TF32 on Ampere and
newer GPUs (10-bit mantissa products, fp32 accumulation), which PyTorch leaves off by default.
On the CPU nothing changes: bf16 matmuls there are slow, so ``base.dtype: auto`` is fp32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fast_matmul", "cast_frozen"]


def fast_matmul(device: torch.device | str) -> bool:
    """Turn TF32 on for fp32 matmuls and convolutions when ``device`` is a CUDA device.

    Process-wide (PyTorch's switch is global): call it where a process picks its GPU (a flock
    worker, a search trial, a pack host, the recycle stage). Returns whether it was turned on.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (sets allow_tf32 as well)
    torch.backends.cudnn.allow_tf32 = True
    return True


@torch.no_grad()
def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point parameters of ``model`` to ``dtype``; trainable ones keep theirs.

    For a base that must be built in fp32 first (a quantised base: its LQ decomposition reads
    the fp32 weights) and then run in bf16 beside fp32 adapters. Call it after the adapters
    were injected (they are trainable then) and before ``set_trainable`` freezes any of them.
    Buffers are left alone (LoRA's rank masks and scales, a quantised layer's packed codes).
    Tied parameters stay tied. Returns the number of parameters cast.
    """
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(p.to(dtype), requires_grad=False)
            module._parameters[name] = new[id(p)]
    return len(new)

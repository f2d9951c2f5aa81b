"""Logit distillation: the loss that lets a pruned model recover from its unpruned teacher.

Why: after FineGates remove 30% of SmolLM2's MLP channels, training the adapters on the
next-token loss alone recovers slowly and overfits small task sets (measured, see
benchmarks/README.md), while matching the unpruned model's full next-token distribution
(Hinton et al. 2015; the recipe of Minitron / Sheared-LLaMA for pruned LLMs) gives every
position V targets instead of one. The teacher is any model over the same vocabulary, e.g.
the ungated base with the task's trained adapters.

Model code only: no Ray here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions of ``T^2 * KL(softmax(t / T) || softmax(s / T))``.

    Args:
        student_logits: (..., V), with gradient.
        teacher_logits: (..., V), same shape; detached here.
        temperature: softening ``T`` (> 0); the ``T^2`` factor keeps gradient scales
            comparable across temperatures.
        mask: optional (...) weights (e.g. 0 on padding / the last position); positions
            are averaged with these weights.

    Returns:
        A scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: both models must share the vocabulary")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    per_pos = F.kl_div(s, q, log_target=True, reduction="none").sum(-1) * (t * t)
    if mask is None:
        return per_pos.mean()
    w = mask.to(per_pos.dtype)
    return (per_pos * w).sum() / w.sum().clamp(min=1e-12)

"""models.train.distill.kd_loss against a direct computation of the KL divergence."""

from __future__ import annotations

import pytest
import torch

from models.train.distill import kd_loss


def _reference(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """sum_v p_t(v) (log p_t(v) - log p_s(v)) * T^2, averaged over positions, by explicit sums."""
    p_t = torch.softmax(t.double() / temp, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s.double() / temp, -1))).sum(-1)
    return kl.mean() * temp**2


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_matches_explicit_kl(temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    torch.testing.assert_close(kd_loss(s, t, temp).double(), _reference(s, t, temp), rtol=1e-5, atol=1e-6)


def test_zero_at_teacher_and_gradient_points_to_it():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 7, generator=g)
    assert float(kd_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    kd_loss(s, t).backward()
    # d/ds KL(p_t || softmax(s)) = softmax(s) - p_t, per position, divided by the positions averaged
    expected = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / 8
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_mask_weights_positions_and_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = kd_loss(s, t, mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got.double(), _reference(s[keep], t.detach()[keep], 1.0), rtol=1e-5, atol=1e-6)
    assert not got.requires_grad  # the teacher is a target, not trained


def test_bad_shapes_and_temperature_are_named():
    with pytest.raises(ValueError, match="share the vocabulary"):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)

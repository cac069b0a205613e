"""Closed-form tests of the pure loss functions (dopsd_bench/losses.py)."""

import math

import pytest
import torch

from dopsd_bench import flow
from dopsd_bench.losses import (
    ema_source_weight,
    ema_update,
    flow_matching_loss,
    per_sample_mse,
    prior_preservation_loss,
    velocity_distillation_loss,
    x0_distillation_loss,
)


def test_flow_matching_loss_closed_form():
    v_pred = torch.zeros(2, 1, 1, 2)
    v_target = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
    # per-sample mse: (1 + 9) / 2 = 5 and (4 + 4) / 2 = 4
    assert per_sample_mse(v_pred, v_target).tolist() == [5.0, 4.0]
    assert flow_matching_loss(v_pred, v_target).item() == pytest.approx(4.5)
    assert flow_matching_loss(v_pred, v_target, torch.tensor([2.0, 0.5])).item() == pytest.approx((10 + 2) / 2)


def test_distillation_losses_zero_when_teacher_equals_student():
    x = torch.randn(3, 4, 2, 2)
    assert x0_distillation_loss(x, x.clone()).item() == 0.0
    assert velocity_distillation_loss(x, x.clone()).item() == 0.0
    assert velocity_distillation_loss(x, x.clone(), torch.rand(3)).item() == 0.0


def test_x0_loss_is_velocity_loss_weighted_by_sigma_squared():
    torch.manual_seed(0)
    x, v_s, v_t = torch.randn(3, 4, 5, 5, dtype=torch.float64).unbind(0)
    x, v_s, v_t = (t.reshape(1, 4, 5, 5).repeat(4, 1, 1, 1) for t in (x, v_s, v_t))
    sigma = torch.tensor([1.0, 0.75, 0.5, 0.1], dtype=torch.float64)
    x0_s, x0_t = flow.x0_from_velocity(x, v_s, sigma), flow.x0_from_velocity(x, v_t, sigma)
    lx0 = x0_distillation_loss(x0_s, x0_t)
    assert lx0.item() == pytest.approx(velocity_distillation_loss(v_s, v_t, sigma).item(), rel=1e-6)
    # per state: ||x0_s - x0_t||^2 = sigma^2 ||v_s - v_t||^2, so at sigma = 1 the two losses agree exactly
    per_v = per_sample_mse(v_s, v_t)
    assert per_sample_mse(x0_s, x0_t).tolist() == pytest.approx((sigma**2 * per_v).tolist(), rel=1e-6)
    assert lx0.item() == pytest.approx(per_v[0].item() * (1 + 0.5625 + 0.25 + 0.01) / 4, rel=1e-6)


def test_distillation_losses_do_not_backprop_into_the_teacher():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    (x0_distillation_loss(s, t) + velocity_distillation_loss(s, t)).backward()
    assert s.grad is not None and t.grad is None
    # d/ds mean (s - t)^2 = 2 (s - t) / N, twice
    assert torch.allclose(s.grad, 2 * 2 * (s - t).detach() / 6)


def test_prior_preservation_weighting():
    inst, prior = torch.tensor(0.3), torch.tensor(0.5)
    assert prior_preservation_loss(inst, prior, 1.0).item() == pytest.approx(0.8)
    assert prior_preservation_loss(inst, prior, 0.0).item() == pytest.approx(0.3)
    assert prior_preservation_loss(inst, prior, 2.5).item() == pytest.approx(0.3 + 1.25)


def test_ema_update_hand_computed():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    source = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0]])]
    ema_update(target, source, 0.9)
    assert target[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2])  # [1.2, 1.8]
    assert target[1].item() == pytest.approx(3.6)
    ema_update(target, source, 0.9)  # second step: 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert target[0][0].item() == pytest.approx(1.38)
    ema_update(target, source, 0.0)  # decay 0 copies
    assert torch.equal(target[0], source[0])
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, source, 1.5)
    with pytest.raises(ValueError, match="matching"):
        ema_update(target, source[:1], 0.5)


def test_ema_source_weight_matches_repeated_updates():
    teacher, student = [torch.zeros(1, dtype=torch.float64)], [torch.ones(1, dtype=torch.float64)]
    for _ in range(150):
        ema_update(teacher, student, 0.9999)
    assert teacher[0].item() == pytest.approx(ema_source_weight(0.9999, 150), rel=1e-9)
    assert ema_source_weight(0.9999, 200) == pytest.approx(1 - math.exp(200 * math.log(0.9999)))
    assert ema_source_weight(0.9999, 200) < 0.021  # at short budgets the EMA teacher ~ its initial weights

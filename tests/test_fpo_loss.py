"""`fpo_loss` against a plain reference implementation and its gradients (Liger style)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _fpo_utils import focal_reference

from trl_lifealign.fpo import fpo_loss

BETA = 0.5
# chosen - rejected log-ratios giving z = β·Δ: right (z > 0), wrong (z < 0), undecided (z = 0) pairs.
CHOSEN = [3.0, -2.0, 0.7, 1.5]
REJECTED = [-1.0, 2.5, 0.7, 1.5]


def _inputs():
    chosen = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    return chosen, rejected


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.5])
def test_matches_plain_reference_and_its_gradient(gamma):
    chosen, rejected = _inputs()
    loss, weight = fpo_loss(chosen, rejected, BETA, gamma)
    grad_c, grad_r = torch.autograd.grad(loss.sum(), (chosen, rejected))

    ref_chosen, ref_rejected = _inputs()
    ref_loss = focal_reference(ref_chosen, ref_rejected, BETA, gamma)
    ref_grad_c, ref_grad_r = torch.autograd.grad(ref_loss.sum(), (ref_chosen, ref_rejected))

    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_c, ref_grad_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_r, ref_grad_r, rtol=1e-10, atol=1e-12)
    z = BETA * (torch.tensor(CHOSEN, dtype=torch.float64) - torch.tensor(REJECTED, dtype=torch.float64))
    torch.testing.assert_close(weight.detach(), (1 - torch.sigmoid(z)) ** gamma)

    # Closed form: dL/dz = (1-p)^γ · [γ·p·log p − (1−p)], and dz/dchosen = β = −dz/drejected.
    p = torch.sigmoid(z)
    dloss_dz = (1 - p) ** gamma * (gamma * p * torch.log(p) - (1 - p))
    torch.testing.assert_close(grad_c, BETA * dloss_dz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_r, -BETA * dloss_dz, rtol=1e-10, atol=1e-12)


def test_right_wrong_undecided_pairs_are_weighted_as_focal():
    chosen, rejected = _inputs()
    loss, weight = fpo_loss(chosen, rejected, BETA, 2.0)
    right, wrong, undecided = weight[0].item(), weight[1].item(), weight[2].item()
    assert right < undecided < wrong  # confident correct pairs count least, wrong ones most
    assert undecided == pytest.approx(0.25)  # p = 1/2 -> (1/2)^2
    assert loss[2].item() == pytest.approx(0.25 * math.log(2.0))


def test_focal_weight_is_in_the_graph():
    chosen, rejected = _inputs()
    loss, _ = fpo_loss(chosen, rejected, BETA, 2.0)
    (grad,) = torch.autograd.grad(loss.sum(), chosen)

    detached_chosen, detached_rejected = _inputs()
    z = BETA * (detached_chosen - detached_rejected)
    detached = -(torch.exp(2.0 * F.logsigmoid(-z)).detach() * F.logsigmoid(z))
    (detached_grad,) = torch.autograd.grad(detached.sum(), detached_chosen)

    # Same values, different gradients (except at p = 1/2 where the extra term γ·p·log p ... is still non-zero).
    torch.testing.assert_close(loss, detached)
    assert not torch.allclose(grad, detached_grad)
    assert (grad - detached_grad).abs().max().item() > 1e-3


def test_gamma_zero_is_exactly_dpo_sigmoid():
    chosen, rejected = _inputs()
    loss, weight = fpo_loss(chosen, rejected, BETA, 0.0)
    expected = -F.logsigmoid(BETA * (chosen - rejected))
    assert torch.equal(loss, expected)
    assert torch.equal(weight, torch.ones_like(weight))
    (grad,) = torch.autograd.grad(loss.sum(), chosen)
    (expected_grad,) = torch.autograd.grad(expected.sum(), chosen)
    assert torch.equal(grad, expected_grad)


def test_stable_for_extreme_margins():
    chosen = torch.tensor([500.0, -500.0, 0.0], requires_grad=True)
    rejected = torch.zeros(3)
    loss, weight = fpo_loss(chosen, rejected, 1.0, 2.0)
    (grad,) = torch.autograd.grad(loss.sum(), chosen)
    assert torch.isfinite(loss).all() and torch.isfinite(weight).all() and torch.isfinite(grad).all()
    assert loss[0].item() == 0.0 and weight[1].item() == 1.0
    assert loss[1].item() == pytest.approx(500.0)  # -(1-0)^2 log σ(-500) = 500
    # The naive expression overflows to nan/inf on the same input: the stable form matters.
    naive = focal_reference(chosen.detach(), rejected, 1.0, 2.0)
    assert not torch.isfinite(naive).all()


@pytest.mark.parametrize("gamma", [-0.1, float("nan"), float("inf")])
def test_invalid_gamma_raises(gamma):
    with pytest.raises(ValueError, match="gamma"):
        fpo_loss(torch.zeros(2), torch.zeros(2), 0.1, gamma)

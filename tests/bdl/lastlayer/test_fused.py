"""The hand-differentiated training loss equals the op-by-op definition, value and gradients."""

from __future__ import annotations

import pytest
import torch

from bdl.lastlayer import VBLLClassification, VBLLRegression

DT = torch.float64
FAMILIES = ["diagonal", "dense", "lowrank"]


def _perturbed(head: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return head


def _compare(head, phi, y):
    params = [phi, *head.parameters()]
    fast = head.loss(phi, y)
    fast_grads = torch.autograd.grad(fast, params)
    ref = head.reference_loss(phi, y)
    ref_grads = torch.autograd.grad(ref, params)
    # both are the same closed-form expressions in float64: agreement to rounding (~1e-15
    # relative); 1e-12 leaves room for summation order
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for g_fast, g_ref in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("covariance", FAMILIES)
@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("wishart_scale", [None, 0.5])
def test_regression_loss_matches_reference(covariance, outputs, wishart_scale):
    head = VBLLRegression(
        5, outputs, num_data=40, covariance=covariance, rank=2, wishart_scale=wishart_scale
    ).to(DT)
    head = _perturbed(head, seed=outputs)
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(7, 5, generator=gen, dtype=DT, requires_grad=True)
    y = torch.randn(7, outputs, generator=gen, dtype=DT)
    _compare(head, phi, y)


@pytest.mark.parametrize("covariance", FAMILIES)
@pytest.mark.parametrize("learn_prior", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_classification_loss_matches_reference(covariance, learn_prior, bias):
    head = VBLLClassification(
        5, 4, num_data=40, covariance=covariance, rank=2, learn_prior=learn_prior, bias=bias
    ).to(DT)
    head = _perturbed(head, seed=2)
    gen = torch.Generator().manual_seed(3)
    phi = torch.randn(9, 5, generator=gen, dtype=DT, requires_grad=True)
    y = torch.randint(4, (9,), generator=gen)
    _compare(head, phi, y)


def test_loss_scales_with_upstream_gradient_and_frozen_features():
    head = _perturbed(VBLLClassification(4, 3, num_data=10).to(DT), seed=5)
    phi = torch.randn(6, 4, dtype=DT)  # frozen features: no gradient asked for them
    y = torch.randint(3, (6,))
    (3.0 * head.loss(phi, y)).backward()
    scaled = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    head.reference_loss(phi, y).backward()
    for g, p in zip(scaled, head.parameters(), strict=True):
        torch.testing.assert_close(g, 3.0 * p.grad, rtol=1e-10, atol=1e-12)


def test_frozen_noise_buffer_gets_no_gradient():
    head = VBLLRegression(3, 1, num_data=10, learn_noise=False).to(DT)
    phi = torch.randn(5, 3, dtype=DT, requires_grad=True)
    head.loss(phi, torch.randn(5, dtype=DT)).backward()
    assert not head.log_noise_std.requires_grad and phi.grad is not None


def test_double_backward_raises_instead_of_returning_wrong_values():
    head = VBLLRegression(3, 1, num_data=10).to(DT)
    phi = torch.randn(4, 3, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(head.loss(phi, torch.randn(4, dtype=DT)), phi, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), phi)


def test_regression_target_gradient_matches_reference():
    head = _perturbed(VBLLRegression(3, 2, num_data=10).to(DT), seed=7)
    phi = torch.randn(4, 3, dtype=DT)
    y = torch.randn(4, 2, dtype=DT, requires_grad=True)
    (fast,) = torch.autograd.grad(head.loss(phi, y), y)
    (ref,) = torch.autograd.grad(head.reference_loss(phi, y), y)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


def test_dtypes_targets_cast_features_checked_and_autocast():
    head = VBLLClassification(3, 2, num_data=10)  # float32
    y = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="features"):
        head.loss(torch.randn(4, 3, dtype=DT), y)
    reg = VBLLRegression(3, 1, num_data=10)
    reg.loss(torch.randn(4, 3), torch.randn(4, dtype=DT)).backward()  # float64 y is cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phi = torch.nn.Linear(5, 3)(torch.randn(4, 5))  # bfloat16 features under autocast
        loss = head.loss(phi, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()

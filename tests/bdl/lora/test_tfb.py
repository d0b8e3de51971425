"""TFB on a tiny BERT built from a config (no hub): the gold standards of the construction."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_bert

from bdl.lora import bayesianize, column_covariance, lora_layers
from bdl.lora.tfb import anchor_metric, reparameterise


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_reparameterisation_preserves_the_adapter(dtype, tol):
    model = tiny_bert(dtype=dtype)
    for _, layer, adapter in lora_layers(model):
        before = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
        U, d = reparameterise(layer, adapter)
        after = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
        scale = before.abs().max()
        assert float((after - before).abs().max() / scale) < (
            tol if dtype == torch.float64 else 1e-5
        )
        torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-5, rtol=0)


def test_sigma_zero_reproduces_the_adapter_logits_exactly():
    model = tiny_bert()
    x = batch()
    with torch.no_grad():
        reference = model(**x).logits
    tfb = bayesianize(model, x, sigma_max=0.5, n_iter=3)
    tfb.sigma.fill_(0.0)
    at_zero = tfb.logit_samples(x)[0]
    torch.testing.assert_close(at_zero, reference, rtol=1e-5, atol=1e-6)  # re-parameterised
    tfb.remove_hooks()
    with torch.no_grad():
        assert torch.equal(at_zero, model(**x).logits)  # the same adapter, bit for bit
    value, labels = anchor_metric(tfb, [x], 0.0, tfb.draw_noise(4, 0), "flip")
    assert value == 0.0 and torch.equal(labels, at_zero.argmax(-1))


def test_noise_has_the_column_covariance_sigma2_UUT():
    """Monte Carlo over the activation-space noise of the first LoRA layer: for an input x the
    added output has covariance s^2 sigma^2 |x|^2 U U^T (columns independent)."""
    model = tiny_bert()
    tfb = bayesianize(model, batch(), sigma_max=0.5, n_iter=2)
    tfb.sigma.fill_(0.2)
    name, layer, adapter = tfb.layers[0]
    x = torch.randn(1, 1, layer.lora_A[adapter].weight.shape[1])
    S = 20000
    noise = tfb.draw_noise(S, 3)
    with torch.no_grad():
        tfb._noise, tfb._scale = noise, 0.2
        hooked = (
            layer(x.expand(S, 1, -1).contiguous())
            - layer.base_layer(x)
            - layer.lora_B[adapter](layer.lora_A[adapter](x)) * layer.scaling[adapter]
        )
        tfb._noise, tfb._scale = None, 0.0
    e = hooked.reshape(S, -1).double()
    expected = column_covariance(tfb, 0) * float(x.double().pow(2).sum())
    cov = torch.cov(e.T)
    scale = expected.diagonal().max()
    # Monte Carlo covariance: standard error about sqrt(2 / S) of the variance scale
    assert float((cov - expected).abs().max() / scale) < 5 * (2 / S) ** 0.5


def test_bisection_brackets_the_boundary_and_the_metric_is_monotone():
    model = tiny_bert()
    x = batch(32)
    tfb = bayesianize(model, x, epsilon=0.02, sigma_max=2.0, n_iter=6, n_samples=8)
    sigmas = sorted(s for s, _ in tfb.search_)
    values = [v for _, v in sorted(tfb.search_)]
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:], strict=False)), values
    lo, hi = tfb.bracket_
    assert hi - lo <= 2.0 / 2**6 + 1e-12 and float(tfb.sigma) == lo
    noise = tfb.draw_noise(8, 0)
    at_lo, _ = anchor_metric(tfb, [x], lo, noise, "nll")
    assert at_lo - tfb.metric_0_ <= 0.02
    if hi < 2.0:
        at_hi, _ = anchor_metric(tfb, [x], hi, noise, "nll")
        assert at_hi - tfb.metric_0_ > 0.02
    assert sigmas[0] > 0


def test_posterior_keeps_samples_and_state_dict_round_trips():
    model = tiny_bert()
    x = batch(10)
    tfb = bayesianize(model, x, epsilon=0.05, sigma_max=1.0, n_iter=4, n_samples=5)
    post = tfb.posterior(x)
    assert post.probs.shape == (10, 3) and post.prob_samples.shape == (5, 10, 3)
    torch.testing.assert_close(post.probs.sum(-1), torch.ones(10))
    state = tfb.state_dict()
    other = bayesianize(tiny_bert(seed=5), x, sigma_max=0.1, n_iter=1, n_samples=5)
    other.load_state_dict(state)
    assert float(other.sigma) == float(tfb.sigma)
    torch.testing.assert_close(other.posterior(x).probs, post.probs)


def test_bad_arguments_are_named():
    model = tiny_bert()
    with pytest.raises(ValueError, match="metric"):
        bayesianize(model, batch(), metric="accuracy")
    with pytest.raises(ValueError, match="sigma_min"):
        bayesianize(model, batch(), sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="no active LoRA"):
        bayesianize(torch.nn.Linear(2, 2), batch())
    with pytest.raises(ValueError, match="mapping of tensors"):
        bayesianize(model, [[1, 2, 3]])

"""Hugging Face models everywhere: dict batches and ModelOutputs through wrap and TFB."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_bert
from torch.utils.data import DataLoader

from bdl.core.batches import logits_of
from bdl.lastlayer import wrap
from bdl.lora import bayesianize


def _labels(n, seed=2):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def test_wrap_takes_dict_batches_and_model_outputs():
    model = tiny_bert()
    x, y = batch(40), _labels(40)
    wrapped = wrap(model, "classification").fit((x, y), epochs=3, seed=0)
    post = wrapped.posterior(x)
    assert post.probs.shape == (40, 3)
    torch.testing.assert_close(post.probs.sum(-1), torch.ones(40))
    # a DataLoader of (dict, labels) pairs, as a tokenizer-collated loader yields them
    pairs = [({k: v[i : i + 8] for k, v in x.items()}, y[i : i + 8]) for i in range(0, 40, 8)]
    again = wrap(model, "classification").fit(DataLoader(pairs, batch_size=None), epochs=3, seed=0)
    assert again.posterior(x).probs.shape == (40, 3)


def test_tfb_on_top_of_a_last_layer_head():
    model = tiny_bert()
    x, y = batch(32), _labels(32)
    wrapped = wrap(model, "classification").fit((x, y), epochs=3, seed=0)
    before = wrapped.posterior(x).probs
    tfb = bayesianize(
        wrapped, x, epsilon=0.05, sigma_max=1.0, n_iter=4, n_samples=4,
        predictive=lambda m, b: m.posterior(b).probs,
    )  # fmt: skip
    post = tfb.posterior(x)
    assert post.prob_samples.shape == (4, 32, 3)
    tfb.sigma.fill_(0.0)
    torch.testing.assert_close(tfb.posterior(x).probs, before, rtol=1e-4, atol=1e-5)


def test_token_level_outputs_are_refused():
    with pytest.raises(ValueError, match="token-level"):
        logits_of(torch.zeros(2, 5, 3))

"""Variational Bayesian last layers (VBLL) and wrapping of pretrained networks.

Heads are ``nn.Module`` subclasses with a per-datum training ``loss(features, y)`` (negative
ELBO, KL weighted by ``1/num_data``) and ``posterior(features)``; put them on top of any
feature extractor and train in your own loop.
"""

from bdl.lastlayer.classification import VBLLClassification
from bdl.lastlayer.generative import GenerativeVBLLClassification
from bdl.lastlayer.heteroscedastic import HeteroscedasticVBLLRegression
from bdl.lastlayer.regression import VBLLRegression
from bdl.lastlayer.wrap import VBLLWrapper, wrap

__all__ = [
    "VBLLRegression",
    "HeteroscedasticVBLLRegression",
    "VBLLClassification",
    "GenerativeVBLLClassification",
    "VBLLWrapper",
    "wrap",
]

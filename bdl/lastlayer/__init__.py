"""Variational Bayesian last layers (VBLL) and wrapping of pretrained networks.

Every head is an ``nn.Module`` and a :class:`bdl.core.Model` on features: a per-datum
training ``loss(features, y)`` (negative ELBO, KL weighted by ``1/num_data``) to use in your
own loop, ``fit((features, y))`` (minibatch Adam on that loss) and ``posterior(features)``.
:func:`wrap` turns a trained network into a model (:class:`VBLLWrapper`), and
:class:`VBLLNetwork` is an extractor plus a head, the model behind the scikit-learn
estimators of :mod:`bdl.lastlayer.estimators`.
"""

from bdl.lastlayer.classification import VBLLClassification
from bdl.lastlayer.generative import GenerativeVBLLClassification
from bdl.lastlayer.heteroscedastic import HeteroscedasticVBLLRegression
from bdl.lastlayer.network import VBLLNetwork
from bdl.lastlayer.regression import VBLLRegression
from bdl.lastlayer.wrap import VBLLWrapper, wrap

__all__ = [
    "VBLLRegression",
    "HeteroscedasticVBLLRegression",
    "VBLLClassification",
    "GenerativeVBLLClassification",
    "VBLLNetwork",
    "VBLLWrapper",
    "wrap",
]

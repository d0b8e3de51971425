"""Stochastic-gradient MCMC samplers as ``torch.optim.Optimizer`` subclasses.

All samplers share one convention: the user's loss is the *mean* negative log-likelihood of
a minibatch, the optimizer is told the number of training points ``num_data = N``, and it
scales internally so that the target is ``exp(-U(theta) / T)`` with the full-data potential

    U(theta) = N * mean_loss_full(theta) + prior_precision * ||theta||^2 / 2.

With ``lr = eta * N`` the SGLD step is
``theta <- theta - lr * (grad mean_loss + prior_precision * theta / N) + sqrt(2 lr T / N) xi``.

- :class:`SGLD`: Langevin dynamics (Welling & Teh 2011).
- :class:`SGHMC`: Hamiltonian dynamics with friction ``momentum_decay`` (Chen et al. 2014).
- :class:`PSGLD`: RMSprop-preconditioned SGLD (Li et al. 2016), freezable preconditioner.
- :class:`CyclicalSchedule`: cosine cyclical step size with exploration / sampling phases
  (cSG-MCMC, Zhang et al. 2020).
- :class:`SampleCollector`: burn-in, thinning and compact storage of weight samples; a
  :class:`bdl.core.Model` whose ``posterior(X)`` averages the network over them.
- :func:`effective_sample_size`, :func:`rhat`: convergence diagnostics of the draws.
- :func:`gather_chains`, :func:`merge_chains`, :func:`chain_diagnostics`: one chain per
  torch.distributed rank (or per seed), gathered into one collector, with cross-chain
  R-hat and ESS (:mod:`bdl.sgmcmc.chains`).
- :class:`StructuredSampler`: structured SG-MCMC (S-SGMCMC, Alexos et al. 2022) over parameter
  groups (:func:`layer_groups`, :func:`neuron_groups`, :func:`random_groups`), full and dropout
  variants, with a ring or reservoir :class:`ChainBuffer` of past samples; also a
  :class:`bdl.core.Model` (``posterior(X)`` averages over the buffered states).
- :class:`SGMCMCClassifier`, :class:`SGMCMCRegressor`: scikit-learn estimators (cyclical
  SGHMC on an MLP) whose defaults pick the step size with :func:`suggest_lr`.
"""

from bdl._lazy import lazy_exports
from bdl.sgmcmc._base import NonFiniteGradientError, SGMCMCOptimizer
from bdl.sgmcmc.chains import chain_diagnostics, chain_seed, gather_chains, merge_chains
from bdl.sgmcmc.collector import SampleCollector
from bdl.sgmcmc.diagnostics import effective_sample_size, rhat
from bdl.sgmcmc.groups import groups_from_names, layer_groups, neuron_groups, random_groups
from bdl.sgmcmc.psgld import PSGLD
from bdl.sgmcmc.schedule import CyclicalSchedule
from bdl.sgmcmc.sghmc import SGHMC
from bdl.sgmcmc.sgld import SGLD
from bdl.sgmcmc.stepsize import hessian_max_eigenvalue, initial_square_avg, suggest_lr
from bdl.sgmcmc.structured import ChainBuffer, StructuredSampler

# the estimators import scikit-learn: only when used
_LAZY = {name: "bdl.sgmcmc.estimators" for name in ("SGMCMCClassifier", "SGMCMCRegressor")}


__all__ = [
    "SGLD",
    "SGHMC",
    "PSGLD",
    "CyclicalSchedule",
    "SGMCMCOptimizer",
    "NonFiniteGradientError",
    "SampleCollector",
    "effective_sample_size",
    "rhat",
    "gather_chains",
    "merge_chains",
    "chain_diagnostics",
    "chain_seed",
    "StructuredSampler",
    "ChainBuffer",
    "layer_groups",
    "neuron_groups",
    "random_groups",
    "groups_from_names",
    "SGMCMCClassifier",
    "SGMCMCRegressor",
    "suggest_lr",
    "hessian_max_eigenvalue",
    "initial_square_avg",
]

__getattr__, __dir__ = lazy_exports("bdl.sgmcmc", _LAZY, (), globals())

"""Thompson sampling from deterministic function draws.

A posterior draw of a weight-space model is a deterministic, differentiable function
``x -> f(x; W_s)``. Thompson sampling proposes ``argmax_x f_j(x)`` for ``q`` independent draws
``f_1, ..., f_q`` (Thompson 1933; for BO e.g. Kandasamy et al., AISTATS 2018, who batch it
exactly this way). :func:`draw_functions` builds the draws:

- a Bayesian last layer (``VBLLRegression`` heads, ``VBLLNetwork``, a wrapped regression
  network): ``W_s ~ q(W)`` exactly, ``f_s(x) = W_s phi(x) + b``;
- a sample ensemble (SG-MCMC collectors and structured samplers): ``q`` members drawn
  without replacement (with replacement when there are fewer members than draws);
- any model with a ``sample_functions(num)`` method (SSVI networks: weight draws);
- an exact GP: BoTorch's pathwise (Matheron) sample paths (Wilson et al., ICML 2020) of the
  same GP, built as a ``SingleTaskGP`` with the fitted kernel, mean and noise;
- a :class:`~bdl.core.model.TransformedModel` (an estimator's ``model_``): the inner draws
  behind its input transform and outcome untransform.

:func:`thompson_candidates` optimises the ``q`` draws with gradients (``optimize_acqf`` on
the separable sum ``sum_j f_j(x_j)``, so each point maximises its own draw) and falls back to
BoTorch's ``MaxPosteriorSampling`` over a Sobol candidate set for models without function
draws (sparse and state-space GPs). The cost of the gradient path is O(q x restarts x
forward/backward) and independent of the number of observations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.optim import optimize_acqf
from torch import Tensor, nn

from bdl.bo.adapter import BotorchModel, ConditionedModel, as_botorch_model, unwrap_model
from bdl.core.model import Model, TransformedModel
from bdl.core.samples import SamplePosterior
from bdl.core.training import seeded, seeded_generator
from bdl.core.validation import check_int

__all__ = ["NoFunctionDraws", "draw_functions", "thompson_candidates"]

#: random Fourier features of the GP prior paths (BoTorch's default 1024 underestimates the
#: spread of Matérn-5/2 draws by about 10 %; 4096 brings it within a few per cent)
NUM_RANDOM_FEATURES = 4096
#: a function draw maps inputs (..., n, d) to values (S, ..., n, m)
Draws = Callable[[Tensor], Tensor]


class NoFunctionDraws(TypeError):
    """The model has no deterministic function draws (use candidate-set Thompson sampling)."""


def draw_functions(model: object, num_samples: int, *, seed: int | None = None) -> Draws:
    """``num_samples`` deterministic posterior function draws of ``model``.

    Parameters
    ----------
    model : bdl.core.Model, fitted estimator or BotorchModel
    num_samples : int
        Number of draws ``S``.
    seed : int, optional
        Seed of the draws (None: torch's global random state).

    Returns
    -------
    callable
        ``f(X)`` for ``X`` of shape (..., n, d) returns the draws' values (S, ..., n, m) in
        ``X``'s dtype, differentiable in ``X``; the same draws on every call.

    Raises
    ------
    NoFunctionDraws
        For models without function draws (sparse and state-space GPs, heteroscedastic heads,
        and models conditioned on observations since their fit, whose draws would ignore them).
    """
    check_int("num_samples", num_samples)
    if isinstance(model, ConditionedModel):
        # its weights or paths are those of the last fit, blind to the conditioning data
        raise NoFunctionDraws(
            "a conditioned model has no function draws of its own; Thompson sampling uses a "
            "candidate set with its conditioned posterior"
        )
    with seeded(seed):
        return _draws(unwrap_model(model), int(num_samples))


def _draws(model: Model, num: int) -> Draws:
    if isinstance(model, TransformedModel):
        return _transformed_draws(model, _draws(model.model, num))
    from bdl.lastlayer.network import VBLLNetwork
    from bdl.lastlayer.regression import VBLLRegression
    from bdl.lastlayer.wrap import VBLLWrapper

    if isinstance(model, VBLLRegression):
        return _head_draws(model, num)
    if isinstance(model, VBLLNetwork) and isinstance(model.head, VBLLRegression):
        return _composed(model.body, "forward", _head_draws(model.head, num))
    if isinstance(model, VBLLWrapper) and isinstance(model.head, VBLLRegression):
        return _composed(model, "features", _head_draws(model.head, num))
    from gp.exact.model import ExactGP

    if isinstance(model, ExactGP):
        return _gp_path_draws(model, num)
    if callable(getattr(model, "sample_functions", None)):  # e.g. SSVI weight draws
        return model.sample_functions(num)
    if _has_sample_posterior(model):
        return _member_draws(model, num)
    raise NoFunctionDraws(
        f"{type(model).__name__} has no deterministic function draws; Thompson sampling uses "
        "a candidate set for it"
    )


def _transformed_draws(model: TransformedModel, inner: Draws) -> Draws:
    def f(X: Tensor) -> Tensor:
        x = X if model.input_transform is None else model.input_transform(X)
        if model.model_dtype is not None:
            x = x.to(torch.promote_types(x.dtype, model.model_dtype))
        values = inner(x)
        out = model.outcome_transform
        if out is not None:  # y = offset + scale * f (Standardize)
            values = values * out.scale.to(values.dtype) + out.offset.to(values.dtype)
        return values.to(X.dtype)

    return f


def _head_draws(head: nn.Module, num: int) -> Draws:
    """``W_s = mean + S^{1/2} z_s`` for ``num`` standard normals ``z_s`` (k, d) each."""
    weights = head.weights
    with torch.no_grad():
        base = torch.randn((num,) + tuple(weights.mean.shape), dtype=weights.mean.dtype)
        W = (weights.mean + weights.cov.sample_noise(base.to(weights.mean.device))).detach()
    bias = None if head.bias is None else head.bias.detach()

    def f(phi: Tensor) -> Tensor:
        dtype = torch.promote_types(phi.dtype, W.dtype)
        phi = phi.to(dtype)
        # (S, 1.., k, d) against (..., n, d) -> (S, ..., n, k)
        W_b = W.to(dtype).reshape((num,) + (1,) * (phi.dim() - 2) + W.shape[-2:])
        values = phi.unsqueeze(0) @ W_b.mT
        return values if bias is None else values + bias.to(dtype)

    return f


def _composed(module: nn.Module, method: str, head: Draws) -> Draws:
    """``head(module.<method>(X))``, computed in the promoted dtype of ``X`` and ``module``."""
    from bdl.core.validation import network_input
    from bdl.lastlayer._dtype import call_in_dtype, module_dtype

    def f(X: Tensor) -> Tensor:
        dtype = torch.promote_types(X.dtype, module_dtype(module))
        with network_input(X):
            features = call_in_dtype(module, dtype, method, X.to(dtype))
        return head(features).to(X.dtype)

    return f


def _has_sample_posterior(model: Model) -> bool:
    from bdl.sgmcmc._predict import SamplePredictive

    return isinstance(model, SamplePredictive)


def _member_draws(model: Model, num: int) -> Draws:
    """Members of a sample ensemble: ``num`` distinct ones when there are enough."""
    S = int(model._num_states())
    if S == 0:
        raise ValueError(f"{type(model).__name__} holds no samples yet")
    index = torch.randperm(S)[:num] if num <= S else torch.randint(S, (num,))

    def f(X: Tensor) -> Tensor:
        post = model.posterior(X)
        if not isinstance(post, SamplePosterior):
            raise NoFunctionDraws(f"{type(model).__name__} returned {type(post).__name__}")
        return post.samples[index.to(post.samples.device)]

    return f


def _gp_path_draws(gp_model: nn.Module, num: int) -> Draws:
    """Pathwise sample paths of the exact GP through BoTorch (``draw_matheron_paths``)."""
    from botorch.models import SingleTaskGP
    from botorch.sampling.pathwise import draw_kernel_feature_paths, draw_matheron_paths
    from gpytorch.constraints import GreaterThan
    from gpytorch.likelihoods import GaussianLikelihood
    from gpytorch.means import ConstantMean, ZeroMean

    if gp_model.train_X is None or len(gp_model.batch_shape) > 0:
        raise NoFunctionDraws("pathwise draws need a single exact GP with data (set_data)")
    X, y = gp_model.train_X.detach(), gp_model.train_y.detach()
    likelihood = GaussianLikelihood(noise_constraint=GreaterThan(0.0))
    likelihood.noise = gp_model.noise.detach().reshape(1).to(X.dtype)
    mean = ZeroMean() if gp_model.constant is None else ConstantMean()
    if gp_model.constant is not None:
        mean.constant.data.fill_(float(gp_model.constant.detach()))
    stgp = SingleTaskGP(
        X, y.reshape(-1, 1), likelihood=likelihood, covar_module=copy.deepcopy(gp_model.kernel),
        mean_module=mean, outcome_transform=None,
    )  # fmt: skip
    stgp = stgp.to(X.dtype).eval()
    prior = partial(draw_kernel_feature_paths, num_features=NUM_RANDOM_FEATURES)
    paths = draw_matheron_paths(stgp, sample_shape=torch.Size([num]), prior_sampler=prior)

    def f(x: Tensor) -> Tensor:
        flat = x.to(X.dtype).reshape(-1, x.shape[-1])  # paths broadcast batches against S
        values = paths(flat).reshape((num,) + x.shape[:-1] + (1,))
        return values.to(x.dtype)

    return f


class _SeparableDraws(AcquisitionFunction):
    """``sum_j sign * f_j(x_j)`` over a batch ``X`` (b, q, d): maximised jointly, each point
    maximises its own draw (the sum is separable)."""

    def __init__(self, model: BotorchModel, draws: Draws, sign: float) -> None:
        super().__init__(model=model)
        self.draws, self.sign = draws, sign

    def forward(self, X: Tensor) -> Tensor:
        values = self.draws(X)[..., 0]  # (q, b, q)
        q = X.shape[-2]
        own = values.diagonal(dim1=0, dim2=-1)  # (b, q): draw j at point j
        if own.shape[-1] != q:
            raise ValueError(f"expected {q} draws for a batch of {q} points")
        return self.sign * own.sum(-1)


def thompson_candidates(
    model: object,
    bounds: Tensor,
    q: int = 1,
    *,
    maximize: bool = True,
    num_restarts: int = 8,
    raw_samples: int = 256,
    num_candidates: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """``q`` Thompson-sampling proposals: the optimum of ``q`` independent posterior draws.

    Parameters
    ----------
    model : bdl.core.Model, fitted estimator or BotorchModel
        A single-output regression model.
    bounds : Tensor, shape (2, d)
        Lower and upper bounds of the box.
    q : int
        Number of proposals (one per draw).
    maximize : bool
        Maximise (True) or minimise the draws.
    num_restarts, raw_samples : int
        Multi-start gradient optimisation of the draws (``optimize_acqf``).
    num_candidates : int, optional
        Size of the Sobol candidate set for models without function draws (default
        ``min(5000, max(1000, 200 d))``).
    seed : int, optional
        Seeds the draws and the optimiser's starts.

    Returns
    -------
    Tensor, shape (q, d)
    """
    check_int("q", q)
    bounds = torch.as_tensor(bounds)
    if bounds.dim() != 2 or bounds.shape[0] != 2 or not bool((bounds[0] < bounds[1]).all()):
        raise ValueError(f"bounds must have shape (2, d) with lower < upper, got {bounds}")
    adapter = as_botorch_model(model)
    if adapter.num_outputs != 1:
        raise ValueError(
            f"Thompson sampling needs a single-output model, got {adapter.num_outputs}"
        )
    sign = 1.0 if maximize else -1.0
    try:
        draws = draw_functions(adapter, q, seed=seed)
    except NoFunctionDraws:
        return _candidate_set_thompson(adapter, bounds, q, sign, num_candidates, seed)
    acq = _SeparableDraws(adapter, draws, sign)
    with seeded(seed):
        X, _ = optimize_acqf(acq, bounds, q=q, num_restarts=num_restarts, raw_samples=raw_samples)
    return X.detach()


def _candidate_set_thompson(
    model: BotorchModel,
    bounds: Tensor,
    q: int,
    sign: float,
    num_candidates: int | None,
    seed: int | None,
) -> Tensor:
    """BoTorch's ``MaxPosteriorSampling`` over a scrambled Sobol set in the box."""
    from botorch.acquisition.objective import LinearMCObjective
    from botorch.generation import MaxPosteriorSampling
    from botorch.utils.sampling import draw_sobol_samples

    d = bounds.shape[1]
    n = num_candidates or min(5000, max(1000, 200 * d))
    generator = seeded_generator(seed)
    sobol_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    X = draw_sobol_samples(bounds, n, q=1, seed=sobol_seed).squeeze(-2)  # (n, d)
    objective = LinearMCObjective(torch.tensor([sign], dtype=bounds.dtype))
    sampler = MaxPosteriorSampling(model, objective=objective, replacement=False)
    with seeded(seed), torch.no_grad():
        return sampler(X, num_samples=q).detach()

"""Any model of the library as a BoTorch model: :func:`as_botorch_model`.

:class:`BotorchModel` wraps a torch-level :class:`bdl.core.model.Model` (or the ``model_`` of
a fitted estimator, which answers in the user's units) and gives BoTorch what its
acquisition functions and optimisers need: ``num_outputs``, ``batch_shape`` and
``posterior(X, output_indices, observation_noise, posterior_transform)`` on ``batch x q x
d`` inputs, differentiable in ``X`` and in ``X``'s dtype. The posterior is always the joint
over the ``q`` points (every regression model of the library has one), so batch
acquisitions see the correlations between the points of a batch.

:meth:`BotorchModel.condition_on_observations` (and so BoTorch's ``fantasize``, used by
qKnowledgeGradient) returns a :class:`ConditionedModel`: the Gaussian posterior conditioned
on extra observations with every hyperparameter and feature fixed. For an exact GP this is
exactly the GP refitted on the extra data with the same hyperparameters (the posterior GP is
a GP, and conditioning a Gaussian process on more data is the Gaussian conditional of its
joint, Rasmussen & Williams 2006, eq. 2.19); for a Bayesian last layer it is the exact
recursive Bayesian linear-regression update of the head (features fixed); for a sparse GP it
conditions the variational predictive. Sample ensembles (SG-MCMC) cannot be conditioned
this way and raise ``NotImplementedError``.
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.acquisition.objective import PosteriorTransform
from botorch.models.model import FantasizeMixin
from botorch.models.model import Model as BotorchBase
from botorch.posteriors import Posterior as BotorchPosterior
from torch import Tensor

from bdl.bo.posteriors import select_outputs, to_botorch_posterior
from bdl.core.categorical import CategoricalPosterior
from bdl.core.gaussian import GaussianPosterior
from bdl.core.model import Model
from bdl.core.posterior_base import Posterior

__all__ = ["BotorchModel", "ConditionedModel", "as_botorch_model", "unwrap_model"]


def unwrap_model(obj: Any) -> Model:
    """The torch-level model behind ``obj``: a :class:`bdl.core.model.Model` itself, the
    ``model_`` of a fitted estimator, or the model a :class:`BotorchModel` wraps."""
    if isinstance(obj, BotorchModel):
        return obj.model
    if isinstance(obj, Model):
        return obj
    if hasattr(obj, "get_params") and hasattr(obj, "fit"):  # a scikit-learn estimator
        model = getattr(obj, "model_", None)
        if model is None:
            raise ValueError(
                f"obj is an unfitted {type(obj).__name__}: call fit(X, y) before wrapping it"
            )
        return model
    raise TypeError(
        "obj must be a model of the library (bdl.core.Model) or a fitted estimator of it, "
        f"got {type(obj).__name__}"
    )


def as_botorch_model(obj: Any) -> BotorchModel:
    """A BoTorch model over any model or fitted estimator of the library.

    Parameters
    ----------
    obj : bdl.core.Model, fitted estimator or BotorchModel
        E.g. ``gp.ExactGP``, ``gp.SVGP``, a VBLL head or network, an SG-MCMC collector, or a
        fitted ``gp.GPRegressor`` / ``bdl.VBLLRegressor`` (then the model answers in the
        estimator's input and target units).

    Returns
    -------
    BotorchModel
        ``obj`` itself when it already is one.

    Examples
    --------
    >>> from botorch.acquisition import qLogExpectedImprovement
    >>> model = as_botorch_model(gp.GPRegressor().fit(X, y))          # doctest: +SKIP
    >>> acq = qLogExpectedImprovement(model, best_f=y.max())          # doctest: +SKIP
    """
    if isinstance(obj, BotorchModel):
        return obj
    return BotorchModel(unwrap_model(obj))


def _check_x(X: Tensor) -> Tensor:
    if not isinstance(X, Tensor):
        raise ValueError(f"X must be a torch.Tensor of shape batch x q x d, got {type(X)}")
    if X.dim() < 2:
        raise ValueError(f"X must have shape batch x q x d, got {tuple(X.shape)}")
    return X


def _as_noise_flag(observation_noise: bool | Tensor) -> tuple[bool, Tensor | None]:
    """``(include_model_noise, explicit_noise)`` from BoTorch's ``observation_noise``."""
    if isinstance(observation_noise, Tensor):
        return False, observation_noise
    return bool(observation_noise), None


class BotorchModel(BotorchBase, FantasizeMixin):
    """A model of the library seen by BoTorch (see the module docstring).

    Parameters
    ----------
    model : bdl.core.Model
        A regression model (Gaussian or sample posterior).
    """

    #: BoTorch's ``fantasize`` reads this (a fixed-noise likelihood would change its default)
    likelihood = None

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    @property
    def num_outputs(self) -> int:
        return int(self.model.num_outputs)

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size(self.model.batch_shape)

    def latent_posterior(self, X: Tensor, observation_noise: bool = False) -> Posterior:
        """The library's own joint posterior at ``X`` (batch x q x d)."""
        _check_x(X)
        try:
            return self.model.posterior(X, observation_noise=observation_noise, joint=True)
        except ValueError:  # no joint: a classification model is refused with a clear error
            post = self.model.posterior(X)
            if isinstance(post, CategoricalPosterior):
                to_botorch_posterior(post)  # raises the TypeError
            raise

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform: PosteriorTransform | None = None,
        **kwargs: Any,
    ) -> BotorchPosterior:
        """Joint posterior at ``X`` (batch x q x d) as a BoTorch posterior (batch x q x m).

        ``observation_noise`` may be a tensor of noise variances (batch x q x m, BoTorch's
        ``fantasize``), added to the latent posterior.
        """
        include_noise, noise = _as_noise_flag(observation_noise)
        post = self.latent_posterior(X, observation_noise=include_noise)
        return _finish(post, noise, output_indices, posterior_transform)

    def noise_variance(self, X: Tensor) -> Tensor:
        """Observation-noise variance at ``X`` (batch x q x d) -> (batch x q x m), read off the
        model as the difference of its noisy and latent marginal variances."""
        noisy = self.model.posterior(X, observation_noise=True).variance
        latent = self.model.posterior(X, observation_noise=False).variance
        return (noisy - latent).clamp_min(0.0)

    def condition_on_observations(
        self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any
    ) -> ConditionedModel:
        """The posterior conditioned on ``Y`` (..., k, m) observed at ``X`` (..., k, d).

        Parameters
        ----------
        noise : Tensor, optional
            Observation-noise variances of ``Y`` (..., k, m); default the model's own.
        """
        return ConditionedModel(self, X, Y, noise)


class ConditionedModel(BotorchModel):
    """A Gaussian model's posterior conditioned on extra observations (hyperparameters and
    features fixed); see the module docstring.

    Parameters
    ----------
    base : BotorchModel
        The model before conditioning.
    X : Tensor, shape (..., k, d)
    Y : Tensor, shape (..., k, m)
        Leading dimensions of ``Y`` beyond those of ``X`` (BoTorch's fantasies) become part of
        :attr:`batch_shape`.
    noise : Tensor, shape (..., k, m), optional
        Noise variances of ``Y``; default the base model's noise at ``X``.
    """

    def __init__(self, base: BotorchModel, X: Tensor, Y: Tensor, noise: Tensor | None) -> None:
        _check_x(X)
        m = base.num_outputs
        if Y.dim() < 2 or Y.shape[-1] != m or Y.shape[-2] != X.shape[-2]:
            raise ValueError(
                f"Y must have shape (..., {X.shape[-2]}, {m}) to match X {tuple(X.shape)}, "
                f"got {tuple(Y.shape)}"
            )
        if not bool(torch.isfinite(Y).all()):
            raise ValueError("Y contains NaN or inf")
        with torch.no_grad():
            probe = base.latent_posterior(X)
            if not isinstance(probe, GaussianPosterior):
                raise NotImplementedError(
                    f"{type(base.model).__name__} has a {type(probe).__name__}: only Gaussian "
                    "posteriors can be conditioned on observations (refit the model instead)"
                )
            if noise is None:
                noise = base.noise_variance(X)
        if isinstance(base, ConditionedModel):  # fold repeated conditioning into one
            lead = torch.broadcast_shapes(base.Y.shape[:-2], Y.shape[:-2])
            X = torch.cat([_expand(base.X, lead), _expand(X, lead)], dim=-2)
            Y = torch.cat([_expand(base.Y, lead), _expand(Y, lead)], dim=-2)
            noise = torch.cat([_expand(base.noise, lead), _expand(noise, lead)], dim=-2)
            base = base.base
        super().__init__(base.model)
        self.base = base
        self.X, self.Y = X.detach(), Y.detach()
        self.noise = noise.detach().to(Y.dtype).expand(Y.shape)

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.base.batch_shape, self.Y.shape[:-2])

    def latent_posterior(self, X: Tensor, observation_noise: bool = False) -> Posterior:
        _check_x(X)
        k = self.X.shape[-2]
        lead = torch.broadcast_shapes(self.X.shape[:-2], X.shape[:-2])
        both = torch.cat([_expand(self.X.to(X.dtype), lead), _expand(X, lead)], dim=-2)
        joint = self.base.latent_posterior(both)  # Gaussian: checked at construction
        post = gaussian_conditional(joint, k, self.Y.to(X.dtype), self.noise.to(X.dtype))
        if observation_noise:
            post = post.add_observation_noise(self.base.noise_variance(X))
        return post


def _expand(t: Tensor, lead: torch.Size) -> Tensor:
    return t.expand(lead + t.shape[-2:])


def gaussian_conditional(joint: GaussianPosterior, k: int, Y: Tensor, noise: Tensor) -> Posterior:
    """Posterior of the last ``q`` points of ``joint`` (over ``k + q`` points) given noisy
    observations ``Y`` (..., k, m) of the first ``k`` (noise variances ``noise``).

    With ``A = S_cc + diag(noise)``: mean ``mu_x + S_xc A^{-1} (Y - mu_c)``, covariance
    ``S_xx - S_xc A^{-1} S_cx`` (Rasmussen & Williams 2006, eq. A.6), in interleaved order.
    """
    mean, cov = joint.mean, joint.covariance_matrix
    m = mean.shape[-1]
    c = k * m
    A = cov[..., :c, :c] + torch.diag_embed(noise.flatten(-2))
    S_xc = cov[..., c:, :c]
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        raise ValueError("the conditioning observations' covariance is not positive definite")
    resid = (Y - mean[..., :k, :]).flatten(-2).unsqueeze(-1)  # (..., c, 1)
    lead = torch.broadcast_shapes(resid.shape[:-2], L.shape[:-2])
    L_b = L.expand(lead + L.shape[-2:])
    W = torch.linalg.solve_triangular(L, S_xc.mT, upper=False)  # L^{-1} S_cx
    v = torch.linalg.solve_triangular(L_b, resid.expand(lead + resid.shape[-2:]), upper=False)
    new_mean = mean[..., k:, :] + (W.mT @ v).squeeze(-1).reshape(lead + mean[..., k:, :].shape[-2:])
    new_cov = cov[..., c:, c:] - W.mT @ W
    new_cov = 0.5 * (new_cov + new_cov.mT)
    diag = new_cov.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    new_cov = (
        new_cov - torch.diag_embed(new_cov.diagonal(dim1=-2, dim2=-1)) + torch.diag_embed(diag)
    )
    new_cov = new_cov.expand(new_mean.shape[:-2] + new_cov.shape[-2:])
    return GaussianPosterior(new_mean, covariance=new_cov)


def _finish(
    post: Posterior,
    noise: Tensor | None,
    output_indices: list[int] | None,
    posterior_transform: PosteriorTransform | None,
) -> BotorchPosterior:
    if noise is not None:
        if not isinstance(post, GaussianPosterior):
            raise TypeError("a tensor observation_noise needs a Gaussian posterior")
        post = post.add_observation_noise(noise.to(post.dtype))
    post = select_outputs(post, output_indices)
    out = to_botorch_posterior(post)
    if posterior_transform is not None:
        out = posterior_transform(out)
    return out

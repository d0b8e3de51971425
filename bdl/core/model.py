"""The model protocol every torch-level model of ``bdl`` and ``gp`` implements.

A :class:`Model` answers one question: ``posterior(X, *, observation_noise=False,
joint=False)``, the predictive distribution at inputs ``X`` of shape ``(..., n, d)``
(``batch_shape x q x d`` in BoTorch's notation). Models that are trained by a loop
also have ``fit(data, *, epochs, lr, batch_size, seed, verbose) -> self`` with the per-epoch
losses in ``history_``; model-specific options are constructor arguments or keyword-only
extras after these.

:class:`TransformedModel` puts input and outcome transforms around any model, so that a
model fitted on standardised data answers in the user's units; scikit-learn estimators
expose their fitted model that way as ``model_``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from bdl.core.posterior import Posterior
from bdl.core.validation import check_inputs

__all__ = ["Model", "TransformedModel", "cast_posterior"]


class Model(ABC):
    """Mixin and abstract base of every torch-level model.

    Subclasses implement :meth:`posterior` and :attr:`num_outputs`; :attr:`batch_shape`
    defaults to ``torch.Size([])`` (one model) and :meth:`fit` to "not trainable by a
    loop" (models fitted otherwise, e.g. by type-II maximum likelihood or by collecting
    samples, say so in their own ``fit``).
    """

    history_: list[float]

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Number of outputs ``m`` of the posterior (classes for a categorical posterior)."""

    @property
    def batch_shape(self) -> torch.Size:
        """Shape of a batch of independent models held by this one (empty: a single model)."""
        return torch.Size([])

    @abstractmethod
    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> Posterior:
        """Predictive distribution at ``X``.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Inputs with any leading batch shape; the posterior's dtype and device follow
            ``X``, and it is differentiable in ``X`` wherever the model is.
        observation_noise : bool, default False
            Predictive of ``y = f + eps`` instead of the latent ``f`` (regression). A
            posterior over class labels already describes observations: the flag has no
            effect there. A model whose posterior is over a latent ``f`` with a
            non-Gaussian likelihood raises ``ValueError`` (the predictive of ``y`` is then
            not of the returned kind).
        joint : bool, default False
            A full joint covariance across the ``n`` points. Models without a joint raise
            ``ValueError``; sample-based posteriors are joint by construction (every draw
            is a whole function) and accept it.

        Returns
        -------
        Posterior
            ``mean`` and ``variance`` of shape ``(..., n, m)``.
        """

    def fit(
        self,
        data: Any,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
    ) -> Model:
        """Train on ``data``; per-epoch losses in ``history_``. Returns self."""
        raise NotImplementedError(f"{type(self).__name__} is not trained by fit")


class TransformedModel(nn.Module, Model):
    """A model behind an input transform and an outcome transform, in the user's units.

    ``posterior(X)`` maps ``X`` through ``input_transform`` (differentiably), asks ``model``
    and undoes ``outcome_transform`` on the result; dtype follows ``X``.

    Parameters
    ----------
    model : Model
        The fitted model in transformed units.
    input_transform : nn.Module, optional
        E.g. :class:`bdl.core.transforms.Normalize`.
    outcome_transform : nn.Module, optional
        E.g. :class:`bdl.core.transforms.Standardize`; needs ``untransform_posterior``.
    model_dtype : torch.dtype, optional
        Dtype the inner model was fitted in: inputs of lower precision are promoted to it
        (results come back in ``X``'s dtype), inputs of higher precision are kept.
    """

    def __init__(
        self,
        model: Model,
        input_transform: nn.Module | None = None,
        outcome_transform: nn.Module | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.input_transform = input_transform
        self.outcome_transform = outcome_transform
        self.model_dtype = model_dtype

    @property
    def num_outputs(self) -> int:
        return self.model.num_outputs

    # A model that is not an nn.Module (e.g. an SG-MCMC sample collector) still moves with
    # .to()/.cpu()/.double() (through its own _apply) and saves with state_dict (as extra
    # state), so that the estimator around it pickles and round-trips like any module.
    def _apply(self, fn: Any, recurse: bool = True) -> TransformedModel:
        super()._apply(fn, recurse)
        if not isinstance(self.model, nn.Module) and hasattr(self.model, "_apply"):
            self.model._apply(fn)
        return self

    def get_extra_state(self) -> Any:
        if isinstance(self.model, nn.Module) or not hasattr(self.model, "state_dict"):
            return {}
        return self.model.state_dict()

    def set_extra_state(self, state: Any) -> None:
        if state:
            self.model.load_state_dict(state)

    @property
    def batch_shape(self) -> torch.Size:
        return self.model.batch_shape

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False, **kwargs: Any
    ) -> Posterior:
        """Posterior at ``X`` (..., n, d) in the user's units; extra keywords go to the model."""
        X = check_inputs(X)
        dtype = X.dtype
        x = X if self.input_transform is None else self.input_transform(X)
        if self.model_dtype is not None:  # never below the model's precision
            x = x.to(torch.promote_types(x.dtype, self.model_dtype))
        post = self.model.posterior(x, observation_noise=observation_noise, joint=joint, **kwargs)
        if self.outcome_transform is not None:
            post = self.outcome_transform.untransform_posterior(post)
        return cast_posterior(post, dtype)


def cast_posterior(post: Posterior, dtype: torch.dtype) -> Posterior:
    """``post`` in ``dtype`` (a no-op when it already is); categorical labels stay integers."""
    if post.dtype == dtype:
        return post
    return post.to(dtype)

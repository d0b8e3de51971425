"""Turn a trained network into a Bayesian-last-layer model.

:func:`wrap` cuts a trained ``nn.Module`` at its final ``nn.Linear``: everything before it becomes
a feature extractor ``phi(x)`` and the layer itself is replaced by a VBLL head whose mean starts
at the layer's weights. :meth:`VBLLWrapper.fit` then either

- ``method="posthoc"``: freezes the extractor, caches the training features once and fits the
  head on them (regression: exact Bayesian linear regression with the noise and the prior
  variance set by type-II maximum likelihood; classification: the head's ELBO by Adam), or
- ``method="finetune"``: trains extractor and head jointly on the head's per-datum ELBO.

Example
-------
>>> model = wrap(trained_net, "classification").fit(train_loader)
>>> model.posterior(x_test).probs  # (n, C)
"""

from __future__ import annotations

import copy as _copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdl.core.batches import batch_size, call, output_tensor, split_batch
from bdl.core.model import Model
from bdl.core.posterior import CategoricalPosterior, GaussianPosterior
from bdl.core.training import seeded_generator, train, training_mode
from bdl.core.validation import check_choice, check_int, check_positive, check_tensor, network_input
from bdl.lastlayer._dtype import posterior_in_input_dtype
from bdl.lastlayer._fit import train_head
from bdl.lastlayer._wrap_utils import (
    Batch,
    batch_source,
    checked_features,
    find_linear,
    split_name,
)
from bdl.lastlayer.classification import VBLLClassification
from bdl.lastlayer.regression import VBLLRegression

__all__ = ["wrap", "VBLLWrapper"]

TASKS = ("regression", "classification")
METHODS = ("posthoc", "finetune")


class VBLLWrapper(nn.Module, Model):
    """A feature extractor plus a VBLL head, built by :func:`wrap` from a trained network.

    A :class:`bdl.core.Model`: ``posterior(X)`` on the network's inputs and ``fit(data)``.

    Attributes
    ----------
    extractor : nn.Module
        The network with its final linear layer replaced by ``nn.Identity``: ``x -> phi(x)``
        of shape ``(n, d)``.
    head : VBLLRegression or VBLLClassification
        The Bayesian last layer; it sees centred features ``phi(x) - feature_mean``.
    reference_layer : nn.Linear
        A frozen copy of the replaced layer (used to check that it is the net's last operation
        and to compare against the original point prediction).
    feature_mean : Tensor, shape (d,)
        Mean training feature (a buffer, set by :meth:`fit`). Centring makes the head's
        point-estimated offset uncorrelated with its weights, so the closed-form fit, the ELBO
        and the predictive variance agree, and the epistemic variance grows with the distance
        from the bulk of the training features rather than from an arbitrary origin.
    layer_name : str
        Dotted name of the replaced layer in the original network.
    task : {"regression", "classification"}
    method : {"posthoc", "finetune"}
    predict_batch_size : int
        Chunk size of the inputs in :meth:`posterior`.
    history_ : list of float
        Mean training loss (negative ELBO per datum) of each epoch of the last :meth:`fit`;
        for the closed-form ``posthoc`` regression fit, one value: the loss at that optimum.
    fit_info_ : dict
        For regression, what the closed-form fit returned: ``log_evidence``,
        ``noise_variance`` and ``prior_variance``, each of shape ``(m,)``.
    """

    def __init__(
        self,
        extractor: nn.Module,
        head: VBLLRegression | VBLLClassification,
        reference_layer: nn.Linear,
        *,
        layer_name: str,
        task: str,
        method: str,
    ) -> None:
        super().__init__()
        check_choice("task", task, TASKS)
        check_choice("method", method, METHODS)
        self.extractor = extractor
        self.head = head
        self.reference_layer = reference_layer.requires_grad_(False)
        self.layer_name = layer_name
        self.task, self.method = task, method
        self.predict_batch_size = 1024
        weight = reference_layer.weight
        self.register_buffer(
            "feature_mean", torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        )
        self.history_: list[float] = []
        self.fit_info_: dict[str, Tensor] = {}

    # -- basic properties ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.reference_layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.reference_layer.weight.dtype

    @property
    def num_outputs(self) -> int:
        """Number of regression outputs ``m`` or classes ``C``."""
        return self.reference_layer.out_features

    # -- forward passes --------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Centred features the head sees, ``phi(x) - feature_mean``; shape (n, d).

        Runs in the module's current mode and keeps gradients (a plain forward pass). ``x``
        may be a mapping of tensors (e.g. a tokenizer's output, passed as keyword arguments);
        a record output (``ModelOutput``) gives its ``logits`` field, which the replaced
        classifier layer's input now fills.
        """
        return output_tensor(call(self.extractor, x)) - self.feature_mean

    def forward(self, x: Tensor) -> Tensor:
        """Mean prediction (regression, shape (n, m)) or mean logits (classification, (n, C))."""
        return self.head(self.features(x))

    def posterior(
        self, X: Tensor, *, observation_noise: bool = False, joint: bool = False
    ) -> GaussianPosterior | CategoricalPosterior:
        """Predictive distribution at the inputs ``X``.

        Computed in eval mode, in chunks of :attr:`predict_batch_size` inputs along the first
        dimension, in the promoted dtype of ``X`` and the network, and returned in ``X``'s
        dtype (floating inputs). Gradients are kept only when ``X.requires_grad`` (e.g. for
        optimising an acquisition function); otherwise the pass runs under ``no_grad``.

        Parameters
        ----------
        X : Tensor, shape (n, ...) or (..., n, d)
            Inputs in the format the wrapped network takes; for a network on feature vectors
            (an MLP) any leading batch shape, as ``nn.Linear`` allows.
        observation_noise : bool
            Regression: include the noise variance (predictive of ``y``) or not (latent ``f``).
            Ignored for classification, whose predictive is always over labels.
        joint : bool
            Regression only (``ValueError`` for classification): the full joint covariance
            across the ``n`` points.

        Returns
        -------
        GaussianPosterior or CategoricalPosterior
            Mean and variance of shape (..., n, m) for regression; class probabilities of
            shape (..., n, C) for classification.
        """
        if joint and self.task != "regression":
            raise ValueError("joint=True is only available for task='regression'")
        X = self._prepare_x(X, "X", cast=False)
        if not isinstance(X, Tensor):  # a mapping of tensors: token ids and masks
            with training_mode(self, False), torch.no_grad():
                return self._posterior(X, observation_noise=observation_noise, joint=joint)
        keep_grad = torch.is_grad_enabled() and X.requires_grad
        with training_mode(self, False), torch.set_grad_enabled(keep_grad), network_input(X):
            if not X.is_floating_point():  # e.g. token ids: the network's dtype
                return self._posterior(X, observation_noise=observation_noise, joint=joint)
            return posterior_in_input_dtype(
                self, X, "_posterior", observation_noise=observation_noise, joint=joint
            )

    def _posterior(self, x: Tensor, observation_noise: bool, joint: bool):
        phi = torch.cat([self.features(c) for c in split_batch(x, self.predict_batch_size)])
        if self.task == "regression":
            return self.head.posterior(phi, observation_noise=observation_noise, joint=joint)
        return self.head.posterior(phi)

    # -- fitting ---------------------------------------------------------------------------
    def fit(
        self,
        data: torch.utils.data.DataLoader | Iterable[Batch] | tuple[Tensor, Tensor],
        *,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        verbose: bool = False,
        weight_decay: float = 1e-4,
        max_grad_norm: float = 1.0,
    ) -> VBLLWrapper:
        """Fit the head (``posthoc``) or the head and the extractor (``finetune``).

        Both methods first pass once over ``data`` in eval mode without gradients: the first
        batch checks that the replaced layer really is the network's last operation, and the
        features give the dataset size ``N`` (the head's ``num_data``) and :attr:`feature_mean`.

        - ``posthoc`` regression: closed-form Bayesian linear regression on the cached
          features (noise and prior variance by type-II maximum likelihood); no SGD.
        - ``posthoc`` classification: Adam on the head's parameters only, over the cached
          features, minimising the per-datum negative ELBO (``head.loss``).
        - ``finetune``: AdamW on extractor and head jointly on ``head.loss`` (weight decay on
          the extractor only; the KL term already regularises the head), gradient-norm
          clipping; regression starts from and ends with the closed-form head on the current
          features.

        Parameters
        ----------
        data : DataLoader or iterable of (x, y) batches, or tuple (X, y) of tensors
            ``X`` of shape (N, ...) in the network's input format; ``y`` of shape (N,) or
            (N, m) (regression, float) or (N,) integer labels (classification).
        epochs : int, optional
            Training epochs; default 100 for ``posthoc`` (over cached features, cheap) and 10
            for ``finetune``. Not used by the closed-form ``posthoc`` regression.
        lr : float, optional
            Learning rate; default 1e-2 for ``posthoc`` (head only) and 1e-4 for ``finetune``.
        batch_size : int, default 128
            Minibatch size for tensor data and for the cached features (a DataLoader keeps its
            own batches for passes through the network).
        seed : int, optional
            Seed of the shuffling of tensor data and cached features (None: torch's global
            random state).
        verbose : bool
            Show tqdm progress bars.
        weight_decay : float
            Decoupled weight decay on the extractor's parameters (``finetune`` only).
        max_grad_norm : float
            Gradient-norm clipping threshold.

        Returns
        -------
        self
        """
        finetune = self.method == "finetune"
        epochs = check_int("epochs", epochs if epochs is not None else (10 if finetune else 100))
        lr = check_positive("lr", lr if lr is not None else (1e-4 if finetune else 1e-2))
        batch_size = check_int("batch_size", 128 if batch_size is None else batch_size)
        weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
        generator = None if seed is None else seeded_generator(seed)
        batches = batch_source(data, batch_size, generator, self._prepare_batch)
        self.history_ = []
        with torch.enable_grad():
            phi, y = self._cache_features(batches(False), verbose)
            self.head.num_data = phi.shape[0]
            self._set_feature_mean(phi.mean(0))
            if self.task == "regression":
                self._fit_closed_form(phi, y)
            if not finetune:
                if self.task == "classification":
                    self.history_ += train_head(
                        self.head, phi - self.feature_mean, y, epochs=epochs, lr=lr,
                        batch_size=batch_size, generator=generator,
                        max_grad_norm=max_grad_norm, verbose=verbose,
                    )  # fmt: skip
                else:
                    with torch.no_grad():
                        self.history_.append(float(self.head.loss(phi - self.feature_mean, y)))
                return self
            del phi, y
            self._finetune(batches, epochs, lr, weight_decay, max_grad_norm, verbose)
            if self.task == "regression":
                phi, y = self._cache_features(batches(False), verbose, check=False)
                self._set_feature_mean(phi.mean(0))
                self._fit_closed_form(phi, y)
        return self

    def _set_feature_mean(self, mean: Tensor) -> None:
        """Move the centring point, shifting the head's offset so its mean output is unchanged.

        A head without an offset cannot absorb the shift, so its features stay uncentred.
        """
        if self.head.bias is None:
            return
        with torch.no_grad():
            self.head.bias.add_((mean - self.feature_mean) @ self.head.weights.mean.T)
            self.feature_mean.copy_(mean)

    def _fit_closed_form(self, phi: Tensor, y: Tensor) -> None:
        self.fit_info_ = self.head.fit_closed_form(phi - self.feature_mean, y, learn_prior=True)

    def _finetune(
        self,
        batches: Callable[[bool], Iterator[Batch]],
        epochs: int,
        lr: float,
        weight_decay: float,
        max_grad_norm: float,
        verbose: bool,
    ) -> None:
        """Joint AdamW training of extractor and head on the head's per-datum negative ELBO."""
        body = [p for p in self.extractor.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        groups = [{"params": body, "weight_decay": weight_decay}] if body else []
        groups.append({"params": head, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=lr)
        with training_mode(self, True):
            self.history_ += train(
                lambda x, y: self.head.loss(self.features(x), y),
                optimizer,
                lambda: batches(True),
                epochs,
                max_grad_norm=max_grad_norm,
                desc="VBLL finetune",
                verbose=verbose,
            )

    # -- feature caching and the last-layer check -------------------------------------------
    @torch.no_grad()
    def _cache_features(
        self, batches: Iterator[Batch], verbose: bool, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Raw (uncentred) features and targets of all of ``data``, in eval mode."""
        feats, targets = [], []
        with training_mode(self, False):
            for i, (x, y) in enumerate(tqdm(batches, desc="features", disable=not verbose)):
                if i == 0 and check:
                    phi = checked_features(self.extractor, self.reference_layer, self.layer_name, x)
                else:
                    phi = output_tensor(call(self.extractor, x))
                self._check_y_width(y, f"data batch {i}: y")
                feats.append(phi)
                targets.append(y)
        if not feats:
            raise ValueError("data is empty: it yielded no batches")
        return torch.cat(feats), torch.cat(targets)

    # -- data handling ---------------------------------------------------------------------
    def _prepare_x(self, x: Tensor, name: str, cast: bool = True) -> Tensor:
        if isinstance(x, Mapping):  # keyword inputs (token ids, masks): moved, never cast
            batch_size(x, name)
            return {k: v.to(self.device) for k, v in x.items()}
        check_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name} must have a leading batch dimension, got a scalar")
        x = x.to(self.device)
        return x.to(self.dtype) if cast and x.is_floating_point() else x

    def _prepare_y(self, y: Tensor, name: str) -> Tensor:
        check_tensor(name, y)
        if self.task == "classification":
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
                raise ValueError(
                    f"{name} must hold integer class labels of shape (n,), got dtype {y.dtype} "
                    f"and shape {tuple(y.shape)}"
                )
            return y.to(self.device, torch.long)
        if y.dim() not in (1, 2):
            raise ValueError(f"{name} must have shape (n,) or (n, m), got {tuple(y.shape)}")
        return y.to(self.device, self.dtype)

    def _check_y_width(self, y: Tensor, name: str) -> None:
        """Regression targets must have one column per output of the replaced layer."""
        m = self.num_outputs
        if self.task == "regression" and (
            (y.dim() == 2 and y.shape[1] != m) or (y.dim() == 1 and m > 1)
        ):
            expected = f"(n,) or (n, {m})" if m == 1 else f"(n, {m})"
            raise ValueError(
                f"{name} must have shape {expected} to match the {m} outputs of layer "
                f"{self.layer_name!r}, got {tuple(y.shape)}"
            )

    def _prepare_batch(self, x: Tensor, y: Tensor, where: str) -> Batch:
        x = self._prepare_x(x, f"{where} X")
        y = self._prepare_y(y, f"{where} y")
        if batch_size(x) != y.shape[0]:
            raise ValueError(
                f"{where} X and y have different lengths: {batch_size(x)} and {y.shape[0]}"
            )
        return x, y


def wrap(
    net: nn.Module,
    task: str = "regression",
    *,
    last_layer: str | None = None,
    covariance: str = "dense",
    method: str = "posthoc",
    copy: bool = True,
    **head_kwargs: object,
) -> VBLLWrapper:
    """Replace the final ``nn.Linear`` of a trained network by a VBLL head.

    Parameters
    ----------
    net : nn.Module
        A trained network whose output is the output of one ``nn.Linear`` applied to features
        of shape (batch, d); checked on the first batch of :meth:`VBLLWrapper.fit`.
    task : {"regression", "classification"}
        Builds a :class:`VBLLRegression` (``m = out_features`` outputs) or a
        :class:`VBLLClassification` (``C = out_features`` classes, >= 2) head.
    last_layer : str, optional
        Dotted name (as in ``net.named_modules()``) of the layer to replace; default the last
        ``nn.Linear`` in ``named_modules()`` order.
    covariance : {"dense", "diagonal", "lowrank"}
        Covariance family of the head's weight posterior.
    method : {"posthoc", "finetune"}
        What :meth:`VBLLWrapper.fit` does: fit the head on frozen features, or train extractor
        and head jointly.
    copy : bool
        Work on a deep copy of ``net`` (default; ``net`` stays unchanged). With ``False`` the
        layer is replaced in ``net`` itself, which becomes the wrapper's extractor.
    **head_kwargs
        Passed to the head's constructor (``prior_scale``, ``noise_std``, ``wishart_scale``,
        ``rank``, ``predictive``, ...). ``prior_scale`` defaults to ``d * mean(W**2)`` of the
        replaced layer (the prior variance that best explains the trained weights) and
        ``bias`` to whether the layer has one.

    Returns
    -------
    VBLLWrapper
        Head initialised at the layer's weights and bias; call :meth:`VBLLWrapper.fit`.
    """
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    check_choice("task", task, TASKS)
    check_choice("method", method, METHODS)
    name, layer = find_linear(net, last_layer)
    if task == "classification" and layer.out_features < 2:
        raise ValueError(
            f"layer {name!r} has out_features={layer.out_features}; classification needs one "
            "logit per class (>= 2)"
        )
    if not math.isfinite(float(layer.weight.detach().double().abs().sum())):
        raise ValueError(f"layer {name!r} of net has non-finite weights")
    reference = _copy.deepcopy(layer)
    if name == "":
        extractor: nn.Module = nn.Identity()
    else:
        extractor = _copy.deepcopy(net) if copy else net
        parent_name, attr = split_name(name)
        setattr(extractor.get_submodule(parent_name), attr, nn.Identity())

    weight = layer.weight.detach()
    d, k = layer.in_features, layer.out_features
    head_kwargs.setdefault("bias", layer.bias is not None)
    if "prior_scale" not in head_kwargs:
        mean_square = float(weight.double().pow(2).mean())
        head_kwargs["prior_scale"] = mean_square * d if mean_square > 0 else 1.0
    head_cls = VBLLRegression if task == "regression" else VBLLClassification
    head = head_cls(d, k, covariance=covariance, **head_kwargs)  # type: ignore[arg-type]
    head = head.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weights.mean.copy_(weight)
        if head.bias is not None:
            if layer.bias is not None:
                head.bias.copy_(layer.bias.detach())
            else:
                head.bias.zero_()
    return VBLLWrapper(extractor, head, reference, layer_name=name, task=task, method=method)

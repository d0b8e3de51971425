r"""The predictive of a network averaged over weight samples, shared by the sample holders.

:class:`~bdl.sgmcmc.SampleCollector` (thinned states of one chain) and
:class:`~bdl.sgmcmc.StructuredSampler` (its buffer of past states) both answer
``posterior(X)`` the same way: every stored state is put into the network with
``torch.func.functional_call`` (the network's own parameters are never touched), the network
runs in eval mode, and the outputs are read as an equal-weight mixture over the states:

- ``task="classification"``: the network returns logits ``(..., n, C)``; the result is a
  :class:`~bdl.core.posterior.CategoricalPosterior` whose ``probs`` are the mean over states
  of the softmax (probabilities are averaged, not logits) with ``prob_samples`` ``(S, ..., n,
  C)``;
- ``task="regression"``: the network returns ``(..., n, m)`` (or ``(..., n)``, read as
  ``m = 1``); the result is a :class:`~bdl.core.posterior.SamplePosterior` of the outputs
  ``(S, ..., n, m)``, with the observation noise of :math:`y = f(x) + \varepsilon` added for
  ``observation_noise=True``: a fixed ``noise_variance``, or per state
  :math:`\exp(2 s)` where :math:`s` is a parameter (named by ``log_noise_std``) sampled
  together with the weights.

The states are cast to the dtype and device of ``X``, so the posterior follows ``X`` (float64
inputs give a float64 predictive of a float32 chain) and is differentiable in ``X``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bdl.core.model import Model
from bdl.core.posterior import CategoricalPosterior, SamplePosterior
from bdl.core.validation import check_choice, check_inputs, check_int, network_input

__all__ = ["SamplePredictive"]

TASKS = ("classification", "regression")


def infer_num_outputs(model: nn.Module) -> int | None:
    """``out_features`` of the last module that has one (the output layer of an MLP)."""
    found = None
    for module in model.modules():
        value = getattr(module, "out_features", None)
        if isinstance(value, int):
            found = value
    return found


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside; every module's train flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class SamplePredictive(Model):
    """Mixin: ``posterior`` of ``self.model`` averaged over stored states (not used directly).

    Subclasses set ``model`` and call :meth:`_init_predictive`, and implement
    :meth:`_num_states`, :meth:`_states` (the stored values of the sampled tensors, one dict
    per state) and :meth:`_empty_message`.
    """

    model: nn.Module

    def _init_predictive(
        self,
        task: str,
        noise_variance: float | Tensor | None,
        log_noise_std: str | None,
        num_outputs: int | None,
    ) -> None:
        self.task = task
        self.noise_variance = noise_variance
        self.log_noise_std = log_noise_std
        self._num_outputs = None if num_outputs is None else check_int("num_outputs", num_outputs)
        self._check_predictive()

    def _check_predictive(self) -> None:
        check_choice("task", self.task, TASKS)
        if self.task == "classification" and (
            self.noise_variance is not None or self.log_noise_std is not None
        ):
            raise ValueError("noise_variance and log_noise_std apply to task='regression' only")
        if self.noise_variance is not None and self.log_noise_std is not None:
            raise ValueError("give at most one of noise_variance and log_noise_std")
        if self.noise_variance is not None:
            noise = torch.as_tensor(self.noise_variance)
            if not bool(torch.isfinite(noise).all()) or bool((noise < 0).any()):
                raise ValueError("noise_variance must be finite and >= 0")
        if self.log_noise_std is not None and not isinstance(self.log_noise_std, str):
            raise ValueError(
                "log_noise_std must be the name of a parameter of model (as in "
                f"named_parameters()), got {type(self.log_noise_std).__name__}"
            )

    # -- the protocol ------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        """Outputs ``m`` of the network (classes for classification).

        The ``num_outputs`` given to the constructor, else the ``out_features`` of the
        network's last module that has one.
        """
        if self._num_outputs is not None:
            return self._num_outputs
        inferred = infer_num_outputs(self.model)
        if inferred is None:
            raise ValueError(
                "cannot infer the number of outputs of this model (no module with "
                "out_features): pass num_outputs to the constructor"
            )
        return inferred

    def posterior(
        self,
        X: Tensor,
        *,
        observation_noise: bool = False,
        joint: bool = False,
        batch_size: int | None = None,
    ) -> CategoricalPosterior | SamplePosterior:
        """Predictive distribution at ``X``, an equal-weight mixture over the stored states.

        Each state is put into the network with ``torch.func.functional_call`` in eval mode;
        the network's own parameters and buffers are never changed and its train/eval flags
        are restored afterwards, even on error.

        Parameters
        ----------
        X : Tensor, shape (..., n, d)
            Inputs, as the network takes them (e.g. ``(n, C, H, W)`` images). The states are
            cast to ``X``'s dtype and device; the posterior is differentiable in ``X``.
        observation_noise : bool, default False
            Regression: add the observation noise (``noise_variance``, or each state's
            ``exp(2 * log_noise_std)``) to every draw's variance. Classification: no effect
            (class probabilities already describe the observed labels).
        joint : bool, default False
            No effect: every draw is a whole function evaluated at all ``n`` points, so the
            mixture is joint across the points either way (``joint_log_prob`` and draws are
            the mixture's).
        batch_size : int, optional
            Evaluate ``X`` in chunks of this many entries along its first dimension.

        Returns
        -------
        CategoricalPosterior or SamplePosterior
            ``task="classification"``: ``probs`` ``(..., n, C)``, the mean over states of the
            softmax of the logits, with ``prob_samples`` ``(S, ..., n, C)``.
            ``task="regression"``: ``samples`` ``(S, ..., n, m)`` (a network output of shape
            ``(..., n)`` is read as ``m = 1``), with the noise variance when
            ``observation_noise=True``.
        """
        X = check_inputs(X)
        if batch_size is not None:
            batch_size = check_int("batch_size", batch_size)
        self._check_predictive()
        if self._num_states() == 0:
            raise ValueError(self._empty_message())
        noisy = observation_noise and self.task == "regression"
        if noisy and self.noise_variance is None and self.log_noise_std is None:
            raise ValueError(
                "observation_noise=True needs the noise: build with noise_variance=... or "
                "log_noise_std='<name of the log noise sd parameter>'"
            )
        outputs, log_stds = [], []
        fixed = self._fixed_tensors(X.dtype, X.device)
        grad = torch.is_grad_enabled() and X.requires_grad
        with eval_mode(self.model), torch.set_grad_enabled(grad), network_input(X):
            for state in self._states(X.dtype, X.device):
                outputs.append(self._output(self._forward({**fixed, **state}, X, batch_size), X))
                if noisy and self.log_noise_std is not None:
                    log_stds.append(self._log_noise_std(state))
        stacked = torch.stack(outputs)
        if self.task == "classification":
            return CategoricalPosterior(stacked.mean(0), prob_samples=stacked)
        if not noisy:
            return SamplePosterior(stacked)
        if self.log_noise_std is None:
            noise = torch.as_tensor(self.noise_variance, dtype=X.dtype, device=X.device)
        else:  # (S, m) -> (S, 1, ..., 1, m)
            per_state = torch.stack(log_stds).mul(2.0).exp()
            noise = per_state.reshape(
                per_state.shape[:1] + (1,) * (stacked.dim() - 2) + per_state.shape[-1:]
            )
        return SamplePosterior(stacked, noise_variance=noise)

    # -- helpers -----------------------------------------------------------------------------
    def _forward(self, state: dict[str, Tensor], X: Tensor, batch_size: int | None) -> Tensor:
        if batch_size is None or batch_size >= X.shape[0]:
            return functional_call(self.model, state, (X,))
        chunks = [functional_call(self.model, state, (c,)) for c in X.split(batch_size)]
        return torch.cat(chunks, dim=0)

    def _output(self, out: Tensor, X: Tensor) -> Tensor:
        if self.task == "classification":
            if out.dim() < 2:
                raise ValueError(
                    "task='classification' needs logits of shape (..., n, C), the model "
                    f"returned shape {tuple(out.shape)}"
                )
            return torch.softmax(out, dim=-1)
        if out.dim() == 1 or out.shape == X.shape[:-1]:
            out = out.unsqueeze(-1)
        return out

    def _log_noise_std(self, state: dict[str, Tensor]) -> Tensor:
        name = self.log_noise_std
        if name in state:
            value = state[name]
        else:
            params = dict(self.model.named_parameters())
            if name not in params:
                raise ValueError(f"log_noise_std={name!r} is not a parameter of the model")
            value = params[name].detach()
        return value.reshape(-1)

    def _fixed_tensors(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Floating parameters and buffers that are not sampled, in ``dtype`` on ``device``
        (only those that need a cast; functional_call uses the rest as they are)."""
        sampled = self._sampled_names()
        fixed = {}
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        for name, t in named:
            if name in sampled or not t.is_floating_point():
                continue
            if t.dtype != dtype or t.device != device or t.requires_grad:
                fixed[name] = t.detach().to(dtype=dtype, device=device)
        return fixed

    @abstractmethod
    def _sampled_names(self) -> set[str]:
        """Names (as in ``named_parameters()``) of the tensors the states hold."""

    @abstractmethod
    def _num_states(self) -> int:
        """Number of stored states."""

    @abstractmethod
    def _states(self, dtype: torch.dtype, device: torch.device) -> Iterator[dict[str, Tensor]]:
        """The stored values of the sampled tensors, one dict per state."""

    def _empty_message(self) -> str:
        return f"{type(self).__name__} holds no samples"

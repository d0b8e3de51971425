r"""Shared machinery of the SG-MCMC optimizers: validation, scaling, noise, finiteness checks.

Convention
----------
The user minimises the *mean* minibatch negative log-likelihood

.. math::

    \bar L(\theta) = -\frac{1}{B} \sum_{i \in \mathcal B} \log p(y_i \mid x_i, \theta),

and passes the number of training points ``num_data`` :math:`= N`. With a Gaussian prior
:math:`\mathcal N(0, \lambda^{-1} I)` (``prior_precision`` :math:`= \lambda`; 0 is a flat
prior) the full-data potential is

.. math::

    U(\theta) = N \bar L_{\mathrm{full}}(\theta) + \tfrac{\lambda}{2} \lVert\theta\rVert^2,

and every sampler here targets :math:`p_T(\theta) \propto \exp(-U(\theta)/T)` (``temperature``
:math:`T`; :math:`T = 0` is optimisation without noise). The optimizer works with the
per-datum gradient :math:`d = \nabla U / N = \nabla \bar L + \lambda \theta / N` and the
deep-learning learning rate ``lr`` :math:`= \eta N`, where :math:`\eta` is the step size on
:math:`U`. Posterior (not likelihood) tempering: the prior is tempered too.

Implementation
--------------
Each parameter group is split into buckets of one device and dtype. A bucket owns one flat
scratch tensor, viewed per parameter, into which the update is built with ``torch._foreach_*``
ops: the Gaussian noise of the whole bucket is one ``normal_`` call. All updates of a step are
built first and checked for finiteness (one reduction per bucket), and only then applied, so a
NaN or inf gradient raises :class:`NonFiniteGradientError` before any parameter or optimizer
state changes.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from bdl.core.validation import check_positive

__all__ = ["SGMCMCOptimizer", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient (or parameter) holds NaN or inf; the step was refused before any change.

    Subclasses both :class:`FloatingPointError` and :class:`ValueError`.
    """


class _Bucket:
    """Parameters of one group sharing a device and dtype, with a flat scratch buffer.

    ``views[j]`` is a view of ``flat`` with the shape of ``params[j]``.
    """

    __slots__ = ("params", "flat", "views")

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        numels = [p.numel() for p in params]
        self.flat = torch.empty(sum(numels), dtype=params[0].dtype, device=params[0].device)
        self.views = [v.view(p.shape) for v, p in zip(self.flat.split(numels), params, strict=True)]

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]


def _check_real(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as float, raising ``ValueError`` naming ``name`` if outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if value != value or below or above:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lo}{low:g}, {high:g}{hi}, got {value}")
    return value


class SGMCMCOptimizer(Optimizer, ABC):
    """Base class of the SG-MCMC optimizers (see the module docstring for the convention).

    Subclasses implement :meth:`_prepare` (build the update of one bucket into its flat
    buffer without changing any state; return what :meth:`_commit` needs) and :meth:`_commit`
    (apply it), and may extend :meth:`_validate_group`.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups, as for any ``torch.optim.Optimizer``.
    defaults : dict
        Group defaults; must hold ``lr``, ``num_data``, ``temperature`` and
        ``prior_precision``.
    generator : torch.Generator, optional
        Source of the injected noise (on the parameters' device); the global RNG if omitted.
        Its state is saved in :meth:`state_dict` and restored by :meth:`load_state_dict`.
    check_finite : bool
        Refuse steps whose gradients are not finite (one reduction and one host sync per
        bucket and step). Turn off only where that sync matters (e.g. CUDA graphs).

    Notes
    -----
    Every parameter group holds ``lr``, ``num_data``, ``temperature``, ``prior_precision``
    and a ``noise`` flag (default ``True``; ``False`` makes a step noise-free, as
    :class:`~bdl.sgmcmc.CyclicalSchedule` does during exploration), plus the sampler's own
    keys. Parameters without a gradient are skipped (no drift, no noise).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        check_finite: bool = True,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.generator = generator
        self.check_finite = bool(check_finite)
        self._layouts: dict[int, tuple[tuple, list[_Bucket]]] = {}
        defaults.setdefault("noise", True)
        super().__init__(params, defaults)

    # -- validation ------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """Checked, normalised hyper-parameters of ``group`` (raises ``ValueError``)."""
        if group.get("num_data") is None:
            raise ValueError(
                "num_data is required: pass the number of training points N, so that the mean "
                "minibatch loss is scaled to the full-data potential U = N * mean loss + prior"
            )
        return {
            "lr": check_positive("lr", group["lr"]),
            "num_data": check_positive("num_data", group["num_data"]),
            "temperature": check_positive("temperature", group["temperature"], allow_zero=True),
            "prior_precision": check_positive(
                "prior_precision", group["prior_precision"], allow_zero=True
            ),
            "noise": bool(group.get("noise", True)),
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyper-parameters (nothing is added on error)."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        checked = self._validate_group(merged)
        super().add_param_group(param_group)
        self.param_groups[-1].update(checked)

    # -- serialisation ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state (buffers, groups) plus ``generator_state`` when a generator is set."""
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load buffers and groups; restore the generator's state when both sides have one."""
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(self._validate_group(group))
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state.cpu())
        self._layouts.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = self.generator
        state["check_finite"] = self.check_finite
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also called by Optimizer.load_state_dict with only "state" and "param_groups"
        super().__setstate__(state)
        if not hasattr(self, "generator"):
            self.generator = None
        if not hasattr(self, "check_finite"):
            self.check_finite = True
        self._layouts = {}

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one sampler step for every parameter that has a gradient.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the (mean minibatch) loss and its gradients; its value is returned.

        Raises
        ------
        NonFiniteGradientError
            If any gradient (or parameter, or the update) is NaN or inf. No parameter or
            optimizer state is changed (the noise generator has advanced).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = []
        for index, group in enumerate(self.param_groups):
            for bucket in self._buckets(index, group):
                pending.append((group, bucket, self._prepare(group, bucket)))
        if self.check_finite:
            for _, bucket, _ in pending:
                # the sum is NaN/inf iff an entry is (or, harmlessly, if it overflows)
                if not math.isfinite(bucket.flat.sum().item()):
                    raise NonFiniteGradientError(self._diagnose(bucket))
        for group, bucket, extra in pending:
            self._commit(group, bucket, extra)
        return loss

    @abstractmethod
    def _prepare(self, group: dict[str, Any], bucket: _Bucket) -> Any:
        """Write the step's update into ``bucket.flat``; return what :meth:`_commit` needs."""

    def _commit(self, group: dict[str, Any], bucket: _Bucket, extra: Any) -> None:
        torch._foreach_add_(bucket.params, bucket.views)

    # -- helpers ---------------------------------------------------------------------------
    def _noise_std(self, group: dict[str, Any], scale: float = 1.0) -> float:
        """``sqrt(2 * scale * lr * T / N)``, or 0 when the group's noise is off."""
        temperature = group["temperature"]
        if not group["noise"] or temperature == 0.0:
            return 0.0
        return math.sqrt(2.0 * scale * group["lr"] * temperature / group["num_data"])

    @staticmethod
    def _add_drift(group: dict[str, Any], bucket: _Bucket, scale: float) -> None:
        """``flat += -scale * (grad + prior_precision * theta / N)`` (the Langevin drift)."""
        torch._foreach_add_(bucket.views, bucket.grads, alpha=-scale)
        if group["prior_precision"]:
            shrink = -scale * group["prior_precision"] / group["num_data"]
            torch._foreach_add_(bucket.views, bucket.params, alpha=shrink)

    def _fill_noise(self, bucket: _Bucket, std: float) -> None:
        """``flat <- std * xi`` with ``xi ~ N(0, I)`` (one draw for the bucket), or zeros."""
        if std > 0.0:
            bucket.flat.normal_(0.0, std, generator=self.generator)
        else:
            bucket.flat.zero_()

    def _buckets(self, index: int, group: dict[str, Any]) -> list[_Bucket]:
        """The group's parameters that have gradients, bucketed by device and dtype (cached)."""
        params = [p for p in group["params"] if p.grad is not None]
        key = tuple((id(p), p.dtype, p.shape) for p in params)
        cached = self._layouts.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        buckets = [_Bucket(ps) for ps in by_kind.values()]
        self._layouts[index] = (key, buckets)
        return buckets

    def _diagnose(self, bucket: _Bucket) -> str:
        """Message naming the first offending tensor of ``bucket``."""
        for where in ("gradient", "parameter"):
            for group_index, group in enumerate(self.param_groups):
                for j, p in enumerate(group["params"]):
                    if not any(p is q for q in bucket.params):
                        continue
                    t = p.grad if where == "gradient" else p
                    if not bool(torch.isfinite(t).all()):
                        return (
                            f"non-finite {where} (NaN or inf) in param_groups[{group_index}]"
                            f"['params'][{j}] of shape {tuple(p.shape)}; the step was refused "
                            "and no parameter or optimizer state was changed"
                        )
        return (
            "the update overflowed the floating-point range (finite gradients and parameters); "
            "the step was refused and nothing was changed: lower lr"
        )

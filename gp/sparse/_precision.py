"""Evaluation of a sparse GP in the promoted dtype of its inputs and its parameters.

A model trained in float32 and queried with float64 inputs must answer with float64
accuracy (values and gradients in ``X``). :func:`call_promoted` therefore runs a method
with every floating parameter and buffer of the module replaced by its cast to the
inputs' dtype (``torch.func.functional_call``): the module is not modified, no copy of it is
kept, and the casts are differentiable, so gradients still reach the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["call_promoted", "compute_dtype"]

T = TypeVar("T")


class _Bound(nn.Module):
    """``fn`` (a method of ``model``) as the forward pass of a module that holds ``model``."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def compute_dtype(module: nn.Module, X: object) -> torch.dtype:
    """The promoted dtype of the floating tensor ``X`` and ``module``'s parameters (the
    parameters' dtype when ``X`` is not a floating tensor)."""
    dtype = _parameter_dtype(module)
    if isinstance(X, Tensor) and X.is_floating_point():
        return torch.promote_types(X.dtype, dtype)
    return dtype


def call_promoted(
    module: nn.Module, X: object, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``fn(X, *args, **kwargs)`` computed in :func:`compute_dtype` of ``module`` and ``X``.

    Parameters
    ----------
    module : nn.Module
        The model; ``fn`` reads its parameters and buffers through its attributes (e.g. a
        bound method of ``module``).
    X : Tensor, shape (..., n, d)
        The inputs.
    fn : callable
        Called as is when the parameters already have the compute dtype; otherwise with
        every floating parameter and buffer of ``module`` cast to it for the duration of the
        call (``X`` itself is left to ``fn``).

    Returns
    -------
    object
        What ``fn`` returns.
    """
    dtype = compute_dtype(module, X)
    if dtype == _parameter_dtype(module):
        return fn(X, *args, **kwargs)
    named = [*module.named_parameters(), *module.named_buffers()]
    cast = {f"model.{name}": t.to(dtype) for name, t in named if t.is_floating_point()}
    return functional_call(_Bound(module, fn), cast, (X, *args), kwargs)

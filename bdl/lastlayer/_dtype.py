"""Running a module in the dtype of its input, as the model protocol asks.

A model holding float32 parameters that is given float64 inputs must answer in float64 (and
be differentiable in the inputs at float64 precision, e.g. for acquisition functions).
:func:`call_in_dtype` runs one method of a module with every floating parameter and buffer
cast (differentiably) to a dtype, leaving the module itself untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bdl.core.model import cast_posterior
from bdl.core.posterior import Posterior

__all__ = ["call_in_dtype", "module_dtype", "posterior_in_input_dtype"]


def _floating(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point():
            yield name, tensor


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of the first floating parameter or buffer of ``module`` (the default if none)."""
    for _, tensor in _floating(module):
        return tensor.dtype
    return torch.get_default_dtype()


class _Method(nn.Module):
    """``forward`` calls one method of ``inner`` (so that ``functional_call`` can run it)."""

    def __init__(self, inner: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


def call_in_dtype(module: nn.Module, dtype: torch.dtype, method: str, *args: Any, **kwargs: Any):
    """``getattr(module, method)(*args, **kwargs)`` with the module's floating parameters and
    buffers cast to ``dtype`` for the call (differentiably; ``module`` is not modified)."""
    fn = getattr(module, method)
    state = dict(_floating(module))
    if all(t.dtype == dtype for t in state.values()):
        return fn(*args, **kwargs)
    cast = {f"inner.{name}": t.to(dtype) for name, t in state.items()}
    return functional_call(_Method(module, method), cast, args, kwargs)


def posterior_in_input_dtype(module: nn.Module, X: Tensor, method: str, **kwargs: Any) -> Posterior:
    """``module.<method>(X, **kwargs)`` computed in the promoted dtype of ``X`` and the module's
    parameters, returned in ``X``'s dtype (float32 inputs of a float64 model are computed in
    float64; float64 inputs of a float32 model too, with the parameters cast)."""
    dtype = torch.promote_types(X.dtype, module_dtype(module))
    post = call_in_dtype(module, dtype, method, X.to(dtype), **kwargs)
    return cast_posterior(post, X.dtype)

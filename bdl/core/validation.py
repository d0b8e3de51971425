"""Input checks shared by models and estimators: clear errors that name the argument."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float, raising ``ValueError`` naming ``name`` if it is not > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_int(name: str, value: int, *, minimum: int = 1) -> int:
    """Return ``value`` as int, raising ``ValueError`` naming ``name`` if it is < ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_sizes(name: str, value: object) -> tuple[int, ...]:
    """A sequence of positive integers (e.g. hidden-layer widths) as a tuple; None is ()."""
    if value is None:
        return ()
    try:
        sizes = tuple(value)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from err
    return tuple(check_int(f"{name}[{i}]", h) for i, h in enumerate(sizes))


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(
    name: str,
    x: Tensor,
    *,
    ndim: int | tuple[int, ...] | None = None,
    last_dim: int | None = None,
    finite: bool = True,
) -> Tensor:
    """Validate a tensor argument.

    Parameters
    ----------
    name : str
        Argument name used in error messages.
    x : Tensor
    ndim : int or tuple of int, optional
        Allowed numbers of dimensions.
    last_dim : int, optional
        Required size of the last dimension.
    finite : bool
        Require every entry to be finite (floating tensors only).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed:
            dims = " or ".join(map(str, allowed))
            raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if last_dim is not None and (x.dim() == 0 or x.shape[-1] != last_dim):
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {tuple(x.shape)}")
    if x.dim() > 0 and x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_same_length(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise ``ValueError`` if ``a`` and ``b`` differ in their first dimension."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} have different lengths: {a.shape[0]} and {b.shape[0]}"
        )


def check_inputs(X: object, d: int | None = None, *, name: str = "X") -> Tensor:
    """Validate model inputs of shape ``(..., n, d)`` (a 1-D tensor is read as ``(n, 1)``).

    Parameters
    ----------
    X : Tensor
        Finite floating-point inputs.
    d : int, optional
        Required number of input dimensions.
    name : str
        Argument name used in error messages.

    Returns
    -------
    Tensor, shape (..., n, d)
    """
    if not isinstance(X, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {X.dtype}")
    if X.dim() == 1:
        X = X.unsqueeze(-1)
    if X.dim() == 0 or X.shape[-2] == 0:
        raise ValueError(f"{name} must have shape (..., n, d) with n >= 1, got {tuple(X.shape)}")
    if d is not None and X.shape[-1] != d:
        raise ValueError(f"{name} must have {d} input dimensions (last dim), got {X.shape[-1]}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return X


_MISMATCH = ("shape", "size", "dtype", "same type", "Expected", "expected", "dimension")


@contextlib.contextmanager
def network_input(X: Tensor, name: str = "X") -> Iterator[None]:
    """Turn a wrapped network's shape or dtype error on ``X`` into a ``ValueError`` naming it.

    A wrapped ``nn.Module`` takes inputs in its own format, so their shape cannot be checked
    up front; a mismatch surfaces as torch's ``RuntimeError`` deep inside the network.
    """
    try:
        yield
    except RuntimeError as err:
        if not any(key in str(err) for key in _MISMATCH):
            raise
        raise ValueError(
            f"{name} of shape {tuple(X.shape)} and dtype {X.dtype} does not fit the network: {err}"
        ) from err

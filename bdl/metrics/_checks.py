"""Input checks and small helpers shared by the metrics (bad input raises ``ValueError``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from bdl.core.validation import check_choice, check_tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")
_LOG_2PI = math.log(2.0 * math.pi)
# Rows of ``probs`` must sum to 1 within this absolute tolerance (loose enough for float32
# softmax outputs over many classes, tight enough to catch logits or unnormalised scores);
# half-precision inputs get 4 machine epsilons instead when that is larger.
_SIMPLEX_ATOL = 1e-3


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of ``tensors`` (the default dtype if none of them is floating)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _check_real(name: str, x: Tensor, ndim: int | tuple[int, ...]) -> Tensor:
    """A finite, non-empty, real tensor with ``ndim`` dims."""
    check_tensor(name, x, ndim=ndim)
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: "
            f"got {tuple(b.shape)} and {tuple(a.shape)}"
        )


def _check_regression(
    mean: Tensor, y: Tensor, *, mean_name: str = "mean", variance: Tensor | None = None
) -> None:
    _check_real(mean_name, mean, (1, 2))
    _check_real("y", y, (1, 2))
    _check_same_shape(mean_name, mean, "y", y)
    if variance is not None:
        _check_real("variance", variance, (1, 2))
        _check_same_shape(mean_name, mean, "variance", variance)
        if not bool((variance > 0).all()):
            raise ValueError("variance must be strictly positive everywhere")


def _check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    """``(n, C)`` floating probabilities in ``[0, 1]`` whose rows sum to 1."""
    check_tensor(name, probs, ndim=2)
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape (n, 0)")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1]")
    row_sums = probs.sum(dim=1, dtype=torch.promote_types(probs.dtype, torch.float32))
    atol = max(_SIMPLEX_ATOL, 4 * torch.finfo(probs.dtype).eps)
    if not bool(((row_sums - 1).abs() <= atol).all()):
        raise ValueError(f"{name} rows must sum to 1 (within {atol:g})")
    return probs


def _check_labels(y: Tensor, n: int, num_classes: int | None, name: str = "y") -> Tensor:
    """Integer ``(n,)`` labels, in ``[0, num_classes)`` when ``num_classes`` is given."""
    check_tensor(name, y, ndim=1)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of class labels, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (one label per row), got {y.shape[0]}")
    if num_classes is not None and not bool(((y >= 0) & (y < num_classes)).all()):
        raise ValueError(f"{name} contains labels outside [0, {num_classes})")
    return y


def _check_classification(probs: Tensor, y: Tensor, probs_name: str = "probs") -> None:
    _check_probs(probs, probs_name)
    _check_labels(y, probs.shape[0], probs.shape[1])


def _reduce(values: Tensor, reduction: str) -> Tensor:
    check_choice("reduction", reduction, _REDUCTIONS)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _default_levels(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(1, 16, dtype=dtype, device=device) / 16


def _as_levels(levels: Tensor | Sequence[float] | None, like: Tensor) -> Tensor:
    dtype = _float_dtype(like)
    if levels is None:
        return _default_levels(dtype, like.device)
    if not isinstance(levels, Tensor):
        try:
            levels = torch.as_tensor(levels, dtype=dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"levels must be a 1-D sequence of floats: {err}") from None
    check_tensor("levels", levels, ndim=1)
    if not bool(((levels > 0) & (levels < 1)).all()):
        raise ValueError("levels must lie in the open interval (0, 1)")
    return levels.to(dtype=dtype, device=like.device)

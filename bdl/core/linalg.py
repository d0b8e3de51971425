"""Small linear-algebra helpers shared by the posterior types and the models."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class JitterWarning(UserWarning):
    """Emitted when a Cholesky factorisation only succeeded after adding jitter."""


def psd_safe_cholesky(
    matrix: Tensor, *, max_tries: int = 6, initial_jitter: float | None = None
) -> Tensor:
    """Cholesky factor of a symmetric PSD matrix, retried with bounded, reported jitter.

    Parameters
    ----------
    matrix : Tensor, shape (..., k, k)
        Symmetric positive (semi-)definite matrices.
    max_tries : int
        Number of jitter escalations (each multiplies the jitter by 10) before giving up.
    initial_jitter : float, optional
        First jitter added to the diagonal, relative to the mean diagonal. Defaults to 1e-8 in
        float64 and 1e-6 in float32.

    Returns
    -------
    Tensor, shape (..., k, k)
        Lower-triangular factor ``L`` with ``L @ L.mT ≈ matrix``.

    Raises
    ------
    ValueError
        If the matrix contains NaN or inf.
    torch.linalg.LinAlgError
        If the matrix is still not positive definite after ``max_tries`` escalations.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix contains NaN or inf; cannot compute a Cholesky factor")
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not bool(info.any()):
        return factor
    if initial_jitter is None:
        initial_jitter = 1e-8 if matrix.dtype == torch.float64 else 1e-6
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).clamp_min(1e-30)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    jitter = initial_jitter
    for _ in range(max_tries):
        jittered = matrix + (jitter * scale).unsqueeze(-1) * eye
        factor, info = torch.linalg.cholesky_ex(jittered)
        if not bool(info.any()):
            warnings.warn(
                f"matrix was not positive definite; added jitter {jitter:.1e} x mean diagonal",
                JitterWarning,
                stacklevel=2,
            )
            return factor
        jitter *= 10.0
    raise torch.linalg.LinAlgError(
        f"Cholesky failed even with jitter {jitter / 10:.1e} x mean diagonal "
        f"after {max_tries} tries; the matrix is not positive definite"
    )

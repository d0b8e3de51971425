"""Batched kernel evaluation in row tiles of bounded memory (CPU or GPU; optional KeOps)."""

from .matvec import (
    BACKENDS,
    TILE_BYTES,
    cross_covariance_chunks,
    default_tile_size,
    kernel_diag,
    kernel_matvec,
)

__all__ = [
    "BACKENDS",
    "TILE_BYTES",
    "cross_covariance_chunks",
    "default_tile_size",
    "kernel_diag",
    "kernel_matvec",
]

"""Exact-by-default GP regression: Cholesky factorisation with analytic gradients."""

from .model import ExactGP, gaussian_log_marginal_likelihood

__all__ = ["ExactGP", "gaussian_log_marginal_likelihood"]

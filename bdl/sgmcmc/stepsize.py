r"""Step-size heuristic for the SG-MCMC samplers: the curvature of the potential at the start.

Reasoning
---------
In the ``num_data`` convention (``lr = eta * N``) the samplers see the per-datum potential
:math:`u(\theta) = U(\theta) / N = \bar L_{\mathrm{full}}(\theta) + \lambda \lVert\theta
\rVert^2 / (2N)`. On a quadratic :math:`u` with Hessian eigenvalue :math:`h` the SGLD chain is
the AR(1) recursion :math:`\theta' = (1 - \mathrm{lr}\, h)\,\theta + \text{noise}`: it is stable
iff :math:`\mathrm{lr}\, h < 2`, and its stationary variance is :math:`T / (N h (1 -
\mathrm{lr}\, h / 2))` (see :mod:`bdl.sgmcmc.sgld`). :func:`suggest_lr` therefore returns

.. math::

    \mathrm{lr}_{\mathrm{SGLD}} = 1 / h_{\max},

half the stability limit in the stiffest direction at the initial weights: the classical
"one Newton step along the top eigenvector" choice (LeCun, Simard & Pearlmutter 1993), the
largest step that still contracts every direction monotonically (:math:`0 \le 1 - \mathrm{lr}
\, h < 1`). It is scale-free: rescaling the loss, the inputs or ``N`` rescales
:math:`h_{\max}` and the suggested ``lr`` inversely.

- **SGHMC** with friction ``momentum_decay`` :math:`\alpha` (``v <- (1 - alpha) v - lr d +
  noise``; ``theta <- theta + v``) moves, in every direction whose relaxation takes many steps,
  like SGLD with step :math:`\mathrm{lr} / \alpha` (the velocity settles at
  :math:`-\mathrm{lr}\, d / \alpha`; the noise ``2 alpha lr T / N`` likewise matches SGLD's
  ``2 (lr / alpha) T / N`` after the velocity's :math:`1/\alpha` steps of memory). The same
  rule on that effective step gives :math:`\mathrm{lr} = \alpha / h_{\max}`, which is also a
  factor :math:`2(2-\alpha)/\alpha` inside the heavy-ball stability limit
  :math:`\mathrm{lr}\, h < 2(2 - \alpha)`.
- **pSGLD** preconditions with :math:`G = \operatorname{diag}(1 / (\epsilon + \sqrt V))`:
  the chain is SGLD on :math:`G^{1/2}` -rescaled coordinates, whose Hessian is
  :math:`G^{1/2} H G^{1/2}`, so :math:`h_{\max}` is that matrix's top eigenvalue, with
  :math:`V` the mean squared minibatch gradient at the start (what the preconditioner's
  running average estimates; :func:`initial_square_avg`).

:math:`h_{\max}` is estimated by power iteration with Hessian-vector products (double
backpropagation) on up to ``max_points`` training points. Power iteration converges to the
eigenvalue of largest *magnitude*, the spectral radius, which bounds the top eigenvalue from
above: if a negative eigenvalue dominates, the suggested step is only smaller (safer).
During training the curvature of a network's loss grows ("progressive sharpening"); the
cyclical schedule the estimators use lowers ``lr`` towards 0 in every cycle's sampling phase,
so the samples are drawn where ``lr * h`` is small whatever the curvature has become.

Why at the initial weights, not at a warm-started mode: at a mode that fits the training
labels, the cross-entropy Hessian :math:`J^\top (\operatorname{diag} p - p p^\top) J` shrinks
with the softmax saturating, so :math:`h_{\max}` there understates the curvature the chain
meets once the injected noise moves it off the mode: a step re-measured after a noise-free
warm start can be much larger and make the chain run hot (the user guide's "Estimators"
section has the details).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdl.core.validation import check_choice, check_int, check_positive

__all__ = ["hessian_max_eigenvalue", "initial_square_avg", "suggest_lr"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _trainable(model: nn.Module) -> list[Tensor]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return params


def _check_data(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be torch.Tensors")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have at least one row, got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different lengths: {x.shape[0]} and {y.shape[0]}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def _subset(
    x: Tensor, y: Tensor, max_points: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    if x.shape[0] <= max_points:
        return x, y
    idx = torch.randperm(x.shape[0], generator=generator)[:max_points].to(x.device)
    return x[idx], y[idx]


def _prior_scales(params: Sequence[Tensor], prior_precision: float | Sequence[float]) -> list:
    if isinstance(prior_precision, (int, float)):
        return [check_positive("prior_precision", prior_precision, allow_zero=True)] * len(params)
    values = [check_positive("prior_precision", float(v), allow_zero=True) for v in prior_precision]
    if len(values) != len(params):
        raise ValueError(
            f"prior_precision must be a float or one value per trainable parameter "
            f"({len(params)}), got {len(values)} values"
        )
    return values


def initial_square_avg(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    num_batches: int = 8,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    r"""Mean squared minibatch gradient of the mean loss, per trainable parameter.

    The value pSGLD's running average :math:`V` estimates at the current weights; used to set
    ``state[p]["square_avg"]`` before the first step (instead of RMSprop's zeros, which make
    the first steps about ten times larger) and by :func:`suggest_lr` for ``"psgld"``.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable
        ``loss_fn(model(x_batch), y_batch)`` is the mean minibatch loss (a scalar).
    x : Tensor, shape (n, ...)
    y : Tensor, shape (n, ...)
    batch_size : int
        Minibatch size of the sampler.
    num_batches : int
        Number of random minibatches averaged.
    generator : torch.Generator, optional
        Source of the minibatch draws.

    Returns
    -------
    list of Tensor
        One tensor per trainable parameter, shaped like it.
    """
    params = _trainable(model)
    _check_data(x, y)
    batch_size = check_int("batch_size", batch_size)
    num_batches = check_int("num_batches", num_batches)
    sums = [torch.zeros_like(p) for p in params]
    n = x.shape[0]
    for _ in range(num_batches):
        idx = torch.randperm(n, generator=generator)[: min(batch_size, n)].to(x.device)
        grads = torch.autograd.grad(loss_fn(model(x[idx]), y[idx]), params, allow_unused=True)
        for s, g in zip(sums, grads, strict=True):
            if g is not None:
                s.add_(g.detach().pow(2))
    return [s / num_batches for s in sums]


def hessian_max_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    num_data: float,
    prior_precision: float | Sequence[float] = 0.0,
    preconditioner: Sequence[Tensor] | None = None,
    num_iterations: int = 30,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    r"""Spectral radius of the Hessian of the per-datum potential, by power iteration.

    The potential is :math:`u(\theta) = \bar L(\theta) + \sum_j \lambda_j \lVert\theta_j
    \rVert^2 / (2N)` with :math:`\bar L` the mean loss on ``(x, y)``; with a
    ``preconditioner`` :math:`G` the matrix is :math:`G^{1/2} \nabla^2 u\, G^{1/2}`.

    Parameters
    ----------
    model : nn.Module
        Network at the weights of interest (its trainable parameters span the space).
    loss_fn : callable
        ``loss_fn(model(x), y)`` is the mean loss (a scalar).
    x, y : Tensor, shape (n, ...)
        Data the Hessian is taken on (all of it: subsample before calling).
    num_data : float
        ``N`` of the prior's share ``lambda / N``.
    prior_precision : float or sequence of float
        Gaussian prior precision, one value or one per trainable parameter.
    preconditioner : sequence of Tensor, optional
        Diagonal :math:`G` (one tensor per trainable parameter, positive entries).
    num_iterations : int
        Maximum number of power iterations.
    tol : float
        Stop when successive Rayleigh quotients agree to this relative tolerance.
    generator : torch.Generator, optional
        Source of the random start vector.

    Returns
    -------
    float
        :math:`|h|_{\max} \ge 0`.
    """
    params = _trainable(model)
    _check_data(x, y)
    num_data = check_positive("num_data", num_data)
    priors = _prior_scales(params, prior_precision)
    num_iterations = check_int("num_iterations", num_iterations)
    tol = check_positive("tol", tol)
    roots = None
    if preconditioner is not None:
        if len(preconditioner) != len(params):
            raise ValueError(
                f"preconditioner must hold one tensor per trainable parameter ({len(params)})"
            )
        roots = [g.detach().sqrt() for g in preconditioner]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g, lam) for p, g, lam in zip(params, grads, priors, strict=True)]
    vec = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    estimate = 0.0
    for it in range(num_iterations):
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in vec))
        if norm == 0.0 or not math.isfinite(norm):
            break
        vec = [v / norm for v in vec]
        probe = vec if roots is None else [r * v for r, v in zip(roots, vec, strict=True)]
        active = [(i, g) for i, (_, g, _) in enumerate(pairs) if g is not None and g.requires_grad]
        hv = [torch.zeros_like(v) for v in vec]
        if active:
            parts = torch.autograd.grad(
                [g for _, g in active],
                [params[i] for i, _ in active],
                grad_outputs=[probe[i] for i, _ in active],
                retain_graph=True,
                allow_unused=True,
            )
            for (i, _), h in zip(active, parts, strict=True):
                if h is not None:
                    hv[i] = h.detach()
        hv = [h + (lam / num_data) * v for h, v, (_, _, lam) in zip(hv, probe, pairs, strict=True)]
        if roots is not None:
            hv = [r * h for r, h in zip(roots, hv, strict=True)]
        new = sum(float((h * v).sum()) for h, v in zip(hv, vec, strict=True))
        converged = it > 0 and abs(abs(new) - abs(estimate)) <= tol * abs(new)
        estimate, vec = new, hv
        if converged:
            break
    # the Rayleigh quotient tends to the dominant eigenvalue; its magnitude is the radius
    return abs(estimate)


def suggest_lr(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    num_data: float,
    sampler: str = "sghmc",
    momentum_decay: float = 0.1,
    prior_precision: float | Sequence[float] = 0.0,
    preconditioner: Sequence[Tensor] | None = None,
    max_points: int = 1024,
    num_iterations: int = 30,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    r"""Learning rate (on the mean loss, ``lr = eta * N``) for an SG-MCMC sampler.

    ``1 / h_max`` for SGLD and pSGLD, ``momentum_decay / h_max`` for SGHMC, with ``h_max`` the
    spectral radius of the per-datum potential's (preconditioned) Hessian at the model's
    current weights; see the module docstring for the reasoning.

    Parameters
    ----------
    model : nn.Module
        The network, at the weights the chain starts from.
    loss_fn : callable
        ``loss_fn(model(x), y)`` is the mean minibatch loss the sampler is driven by.
    x, y : Tensor, shape (n, ...)
        Training data; at most ``max_points`` random rows are used.
    num_data : float
        Number of training points ``N``.
    sampler : {"sgld", "sghmc", "psgld"}
    momentum_decay : float
        SGHMC friction ``alpha`` in ``(0, 1]``.
    prior_precision : float or sequence of float
        The sampler's Gaussian prior precision (one value or one per trainable parameter).
    preconditioner : sequence of Tensor, optional
        pSGLD only: the diagonal ``G = 1 / (eps + sqrt(V))``; required for ``"psgld"``.
    max_points : int
        Size of the random subset the Hessian is taken on.
    num_iterations : int
        Maximum number of power iterations.
    tol : float
        Relative tolerance on successive eigenvalue estimates that stops the iteration.
    generator : torch.Generator, optional
        Source of the subset and the start vector.

    Returns
    -------
    float
        The suggested ``lr`` (> 0).
    """
    check_choice("sampler", sampler, ("sgld", "sghmc", "psgld"))
    alpha = check_positive("momentum_decay", momentum_decay)
    if alpha > 1.0:
        raise ValueError(f"momentum_decay must lie in (0, 1], got {momentum_decay}")
    max_points = check_int("max_points", max_points)
    _check_data(x, y)
    if sampler == "psgld" and preconditioner is None:
        raise ValueError("sampler='psgld' needs the preconditioner G = 1 / (eps + sqrt(V))")
    if sampler != "psgld" and preconditioner is not None:
        raise ValueError("preconditioner applies to sampler='psgld' only")
    xs, ys = _subset(x, y, max_points, generator)
    h_max = hessian_max_eigenvalue(
        model, loss_fn, xs, ys, num_data=num_data, prior_precision=prior_precision,
        preconditioner=preconditioner, num_iterations=num_iterations, tol=tol,
        generator=generator,
    )  # fmt: skip
    if not math.isfinite(h_max):
        raise ValueError("the loss's curvature at the initial weights is not finite")
    if h_max <= 0.0:
        # a linear (zero-curvature) potential: no curvature limit; fall back to the prior's
        raise ValueError(
            "the potential has zero curvature at the initial weights: pass lr explicitly"
        )
    scale = alpha if sampler == "sghmc" else 1.0
    return scale / h_max

"""Training-free Bayesianization of LoRA adapters (TFB; Shi, Wang, Han, Zhang & Wang, 2025).

For every LoRA pair ``Delta W = s B A`` (``B`` of shape (m, r), ``A`` of shape (r, n), peft's
scaling ``s = alpha / r``) of a fine-tuned model:

1. the thin SVD ``B = U diag(d) V^T`` in float32, and the function-preserving
   re-parameterisation ``B' = U diag(d)``, ``A' = V^T A`` (``B' A' = B A``);
2. the posterior ``q(A'_ij) = N(A'_ij, (sigma / d_i)^2)`` with ``B'`` fixed, i.e.
   ``Delta W = s (B' A' + U diag(d / d) Z sigma)``: every column of ``Delta W`` has covariance
   ``s^2 sigma^2 U U^T`` and the columns are independent (``Z`` standard normal, (r, n));
3. one scalar ``sigma`` for the whole model: the largest value whose anchor-set metric moves by
   at most ``epsilon`` from the ``sigma = 0`` model's, found by bisection with the same noise at
   every step (so the metric is a deterministic, monotone function of ``sigma``).

Sampling happens in activation space: a forward hook on every LoRA layer adds
``s sigma U (Z_k x)`` for the ``k``-th of ``S`` samples, the samples batched along the batch
dimension (sample-major); no copy of any weight matrix is made, the noise path runs in the
layer's compute dtype, and ``sigma = 0`` adds nothing (the deterministic adapter's logits
exactly). Zero singular values use ``d_i + 1e-6`` (the factor ``d_i / (d_i + 1e-6)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bdl.core.batches import (
    Batch,
    call,
    iterate_batches,
    logits_of,
    repeat_batch,
    slice_batch,
)
from bdl.core.batches import batch_size as rows_of
from bdl.core.categorical import CategoricalPosterior
from bdl.core.model import Model
from bdl.core.validation import check_choice, check_int, check_positive

__all__ = ["METRICS", "TFBModel", "bayesianize", "lora_layers"]

METRICS = ("nll", "flip")
#: added to a singular value in the posterior standard deviation sigma / d_i
SINGULAR_EPS = 1e-6


def lora_layers(peft_model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, layer, adapter)`` of every active LoRA ``Linear`` layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or not isinstance(module, nn.Module):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if not isinstance(module.lora_A[adapter], nn.Linear):
                raise ValueError(f"layer {name!r}: only LoRA on linear layers is supported")
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise ValueError(f"layer {name!r}: DoRA adapters are not supported")
            found.append((name, module, adapter))
    if not found:
        raise ValueError("peft_model has no active LoRA layer (is it a peft LoRA model?)")
    return found


@torch.no_grad()
def reparameterise(layer: nn.Module, adapter: str) -> tuple[Tensor, Tensor]:
    """Rewrite ``layer``'s pair as ``B' = U diag(d)``, ``A' = V^T A`` in place; returns ``U``
    (m, r) and ``d`` (r,), computed in float32 (float64 for a float64 adapter)."""
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, n), (m, r)
    work = torch.promote_types(B.dtype, torch.float32)
    U, d, Vh = torch.linalg.svd(B.to(work), full_matrices=False)
    new_A = Vh @ A.to(work)
    layer.lora_B[adapter].weight.copy_((U * d).to(B.dtype))
    layer.lora_A[adapter].weight.copy_(new_A.to(A.dtype))
    return U.contiguous(), d.contiguous()


class TFBModel(nn.Module, Model):
    """A Bayesianized peft LoRA classifier (see the module docstring); build it with
    :func:`bayesianize`.

    ``posterior(batch)`` averages the class probabilities of ``n_samples`` noise draws
    (seeded, the same on every call) into a :class:`~bdl.core.posterior.CategoricalPosterior`
    that keeps the per-sample probabilities. ``batch`` is a tensor or a mapping of tensors
    (a tokenizer's output).

    Parameters
    ----------
    peft_model : nn.Module
        The peft model, already re-parameterised (:func:`reparameterise`).
    factors : list of (U, d)
        Per LoRA layer, in the order of :func:`lora_layers`.
    sigma : float
    n_samples : int
    seed : int
    sample_batch : int
        Rows per forward pass (the batch is repeated ``n_samples`` times inside).
    predictive : callable, optional
        ``predictive(peft_model, batch) -> probs`` (b, C) of one noise draw; default the
        softmax of the logits. E.g. ``lambda m, b: m.posterior(b).probs`` when the adapted
        network carries a Bayesian last layer (:func:`bdl.lastlayer.wrap`).
    """

    def __init__(
        self,
        peft_model: nn.Module,
        factors: list[tuple[Tensor, Tensor]],
        sigma: float = 0.0,
        n_samples: int = 10,
        seed: int = 0,
        sample_batch: int = 256,
        predictive: Callable[[nn.Module, Batch], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.predictive = predictive
        self.layers = lora_layers(peft_model)
        if len(factors) != len(self.layers):
            raise ValueError(
                f"factors has {len(factors)} entries for {len(self.layers)} LoRA layers"
            )
        for k, (U, d) in enumerate(factors):
            self.register_buffer(f"U_{k}", U.detach().clone())
            self.register_buffer(f"d_{k}", d.detach().clone())
        self.register_buffer("sigma", torch.tensor(float(sigma), dtype=torch.float64))
        self.n_samples = check_int("n_samples", n_samples)
        self.seed = int(seed)
        self.sample_batch = check_int("sample_batch", sample_batch)
        self._noise: list[Tensor] | None = None  # Z_k of the active pass, each (S, r, n)
        self._scale = 0.0
        self._num_classes: int | None = None
        self._hooks = [
            layer.register_forward_hook(self._hook(k))
            for k, (_, layer, _) in enumerate(self.layers)
        ]

    # -- the noise path --------------------------------------------------------------------
    def _factor(self, k: int) -> Tensor:
        """``U diag(d / (d + eps))`` of layer ``k``, (m, r)."""
        U, d = getattr(self, f"U_{k}"), getattr(self, f"d_{k}")
        return U * (d / (d + SINGULAR_EPS))

    def _hook(self, k: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            if self._noise is None or self._scale == 0.0:
                return None
            x = args[0]
            _, layer, adapter = self.layers[k]
            Z = self._noise[k]
            S = Z.shape[0]
            n, m = x.shape[-1], output.shape[-1]
            xs = x.reshape(S, -1, n).to(output.dtype)  # sample-major: (S, rows, n)
            e = torch.einsum("skn,srn->skr", xs, Z.to(output.dtype))
            noise = e @ self._factor(k).to(output.dtype).T  # (S, rows, m)
            scale = float(layer.scaling[adapter]) * self._scale
            return output + scale * noise.reshape(output.shape[:-1] + (m,))

        return hook

    def draw_noise(self, n_samples: int, seed: int) -> list[Tensor]:
        """Standard-normal ``Z_k`` of shape (S, r, n) for every LoRA layer, from ``seed``."""
        generator = torch.Generator().manual_seed(int(seed))
        noise = []
        for _, layer, adapter in self.layers:
            A = layer.lora_A[adapter].weight
            z = torch.randn((n_samples,) + tuple(A.shape), generator=generator, dtype=torch.float32)
            noise.append(z.to(A.device))
        return noise

    # -- prediction ------------------------------------------------------------------------
    def _logits(self, batch: Batch) -> Tensor:
        return logits_of(call(self.peft_model, batch))

    def _probs(self, batch: Batch) -> Tensor:
        if self.predictive is not None:
            return self.predictive(self.peft_model, batch)
        return self._logits(batch).float().softmax(-1)

    @torch.no_grad()
    def _samples(self, batch: Batch, sigma: float, noise: list[Tensor] | None, fn) -> Tensor:
        """``fn`` of every noise draw, stacked (S, b, C) (S = 1 at ``sigma = 0``)."""
        if sigma == 0.0:
            noise = None
        elif noise is None:
            noise = self.draw_noise(self.n_samples, self.seed)
        S = 1 if noise is None else noise[0].shape[0]
        n = rows_of(batch)
        rows = max(1, self.sample_batch // S)
        chunks = []
        self.peft_model.eval()
        try:
            self._noise, self._scale = noise, sigma
            for start in range(0, n, rows):
                part = slice_batch(batch, start, min(n, start + rows))
                out = fn(repeat_batch(part, S) if S > 1 else part)
                chunks.append(out.reshape(S, -1, out.shape[-1]))
        finally:
            self._noise, self._scale = None, 0.0
        out = torch.cat(chunks, dim=1)
        self._num_classes = out.shape[-1]
        return out

    def logit_samples(
        self, batch: Batch, sigma: float | None = None, noise: list[Tensor] | None = None
    ) -> Tensor:
        """Logits of every noise draw, shape (S, b, C) (S = 1 at ``sigma = 0``)."""
        sigma = float(self.sigma) if sigma is None else float(sigma)
        return self._samples(batch, sigma, noise, self._logits)

    def prob_samples(
        self, batch: Batch, sigma: float | None = None, noise: list[Tensor] | None = None
    ) -> Tensor:
        """Class probabilities of every noise draw (the ``predictive`` of each draw when one
        was given), shape (S, b, C)."""
        sigma = float(self.sigma) if sigma is None else float(sigma)
        return self._samples(batch, sigma, noise, self._probs)

    def posterior(
        self, X: Batch, *, observation_noise: bool = False, joint: bool = False
    ) -> CategoricalPosterior:
        """Class probabilities at ``X`` averaged over the noise draws (``prob_samples`` kept)."""
        if joint:
            raise ValueError(
                "class probabilities are given per example: joint=True is not available"
            )
        probs = self.prob_samples(X).float()
        return CategoricalPosterior(probs.mean(0), prob_samples=probs)

    @property
    def num_outputs(self) -> int:
        if self._num_classes is None:
            config = getattr(self.peft_model, "config", None)
            labels = getattr(config, "num_labels", None)
            if labels is None:
                raise ValueError("number of classes unknown until the first posterior call")
            return int(labels)
        return self._num_classes

    def remove_hooks(self) -> None:
        """Detach the noise hooks (the peft model is then the plain re-parameterised adapter)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def anchor_baseline(model: TFBModel, anchors: list[Batch]) -> list[Tensor]:
    """Class probabilities of the ``sigma = 0`` model on every anchor batch, each (b, C)."""
    return [model.prob_samples(batch, 0.0)[0].float() for batch in anchors]


def anchor_metric(
    model: TFBModel,
    anchors: list[Batch],
    sigma: float,
    noise: list[Tensor],
    metric: str,
    baseline: list[Tensor] | None = None,
) -> tuple[float, Tensor]:
    """Mean NLL of the MC-averaged probabilities against the ``sigma = 0`` pseudo-labels, or
    the fraction of flipped predictions; with the pseudo-labels. ``baseline``: the
    :func:`anchor_baseline` (computed when not given)."""
    baseline = anchor_baseline(model, anchors) if baseline is None else baseline
    nll, flips, count = 0.0, 0, 0
    labels = []
    for batch, base in zip(anchors, baseline, strict=True):
        pseudo = base.argmax(-1)
        labels.append(pseudo)
        probs = base if sigma == 0.0 else model.prob_samples(batch, sigma, noise).float().mean(0)
        picked = probs.gather(-1, pseudo[:, None])[:, 0].clamp_min(1e-12)
        nll -= float(picked.log().sum())
        flips += int((probs.argmax(-1) != pseudo).sum())
        count += pseudo.numel()
    value = nll / count if metric == "nll" else flips / count
    return value, torch.cat(labels)


def bayesianize(
    peft_model: nn.Module,
    anchor_data: Batch | Iterable[Batch],
    *,
    epsilon: float = 0.01,
    metric: str = "nll",
    sigma_max: float = 1.0,
    sigma_min: float = 0.0,
    n_iter: int = 10,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int = 64,
    sample_batch: int = 256,
    predictive: Callable[[nn.Module, Batch], Tensor] | None = None,
) -> TFBModel:
    """Bayesianize every LoRA adapter of ``peft_model`` without training.

    The adapters are re-parameterised in place (the model's function is unchanged).

    Parameters
    ----------
    peft_model : nn.Module
        A peft LoRA model whose forward takes a batch (tensor or mapping) and returns logits
        (b, C) or a ``ModelOutput`` with ``logits``.
    anchor_data : batch or iterable of batches
        Inputs only (labels are not used: the ``sigma = 0`` predictions serve as labels);
        ``(inputs, labels)`` pairs are accepted and the labels ignored.
    epsilon : float, default 0.01
        Largest allowed change of the anchor metric.
    metric : {"nll", "flip"}
        Mean NLL against the pseudo-labels (absolute change), or the fraction of flipped
        predictions.
    sigma_max, sigma_min : float
        Search interval of ``sigma``; ``sigma_max`` is returned when even it keeps the metric
        within ``epsilon``.
    n_iter : int, default 10
        Bisection steps: the result is within ``(sigma_max - sigma_min) / 2^n_iter`` below the
        boundary.
    n_samples : int, default 10
        Noise draws during the search and for prediction (the same draws throughout).
    seed : int, default 0
    batch_size : int, default 64
        Rows per anchor batch when ``anchor_data`` is one batch.
    sample_batch : int, default 256
        Rows per forward pass, samples included.
    predictive : callable, optional
        ``predictive(peft_model, batch) -> probs`` of one draw (see :class:`TFBModel`).

    Returns
    -------
    TFBModel
        With ``sigma``, ``search_`` (the bisection's ``(sigma, metric)`` pairs) and
        ``metric_0_`` (the metric at ``sigma = 0``).
    """
    check_choice("metric", metric, METRICS)
    check_positive("epsilon", epsilon)
    check_positive("sigma_max", sigma_max)
    check_positive("sigma_min", sigma_min, allow_zero=True)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be below sigma_max, got {sigma_min} and {sigma_max}")
    check_int("n_iter", n_iter)
    anchors = list(iterate_batches(anchor_data, check_int("batch_size", batch_size), "anchor_data"))
    if not anchors:
        raise ValueError("anchor_data holds no batch")
    factors = [reparameterise(layer, adapter) for _, layer, adapter in lora_layers(peft_model)]
    model = TFBModel(peft_model, factors, 0.0, n_samples, seed, sample_batch, predictive)
    noise = model.draw_noise(n_samples, seed)
    baseline = anchor_baseline(model, anchors)  # pseudo-labels, computed once
    base, _ = anchor_metric(model, anchors, 0.0, noise, metric, baseline)
    search = []

    def violates(sigma: float) -> bool:
        value, _ = anchor_metric(model, anchors, sigma, noise, metric, baseline)
        search.append((sigma, value))
        return value - base > epsilon

    lo, hi = float(sigma_min), float(sigma_max)
    if not violates(hi):
        lo = hi
    else:
        for _ in range(n_iter):
            mid = 0.5 * (lo + hi)
            if violates(mid):
                hi = mid
            else:
                lo = mid
    model.sigma.fill_(lo)
    model.search_ = search
    model.metric_0_ = base
    model.bracket_ = (lo, hi)
    return model


def column_covariance(model: TFBModel, k: int) -> Tensor:
    """The induced covariance of every column of layer ``k``'s ``Delta W``:
    ``s^2 sigma^2 U diag(d / (d + eps))^2 U^T`` (m, m)."""
    _, layer, adapter = model.layers[k]
    F = model._factor(k).double()
    s = float(layer.scaling[adapter])
    return (s * float(model.sigma)) ** 2 * (F @ F.T)

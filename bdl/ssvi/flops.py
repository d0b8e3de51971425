"""Parameter and FLOP accounting of a sparse Bayesian network against dense mean-field VI.

Counts multiply-adds as 2 FLOPs. Per example and layer with ``s`` active of ``D`` weights and
``P`` output positions (1 for a linear layer, ``H_out W_out`` for a convolution):

- inference with one weight draw: ``2 s P`` (dense: ``2 D P``);
- a training step by local reparameterisation: a mean and a variance pass (``2 x 2 s P``) and
  a backward pass of about twice the forward cost, ``12 s P`` in all (dense: ``12 D P``);
  the topology update adds one dense forward and backward pass (``6 D P``) every
  ``update_every`` steps, amortised per step;
- parameter memory in bytes: a mean and a raw scale per active weight plus a 4-byte index
  (dense VI: a mean and a scale per weight, no index), biases dense in both.

These are the FLOPs a sparse kernel can realise; a dense kernel on zero-filled weights does the
dense work whatever the density (see the wall-time tables of ``benchmarks/bench_ssvi.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdl.ssvi.layers import SparseBayesLayer, sparse_layers
from bdl.ssvi.network import SSVINetwork

__all__ = ["flops"]


def _positions(net: SSVINetwork, example: Tensor) -> dict[SparseBayesLayer, int]:
    """Output positions per example of every sparse layer, from one forward pass."""
    found: dict[SparseBayesLayer, int] = {}
    hooks = []
    for layer in sparse_layers(net):

        def hook(module: SparseBayesLayer, inputs: Any, output: Tensor) -> None:
            per_example = output[0] if output.dim() > 1 else output
            found[module] = per_example.numel() // module.weight_shape[0]

        hooks.append(layer.register_forward_hook(hook))
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(example[:1])
        net.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return found


def flops(net: SSVINetwork, example: Tensor, update_every: int = 25) -> dict[str, Any]:
    """Per-layer and total parameters and FLOPs per example, sparse against dense VI.

    Parameters
    ----------
    net : SSVINetwork
    example : Tensor
        One batch of inputs in the network's layout (only the first row is used).
    update_every : int
        Steps between topology updates (amortises their dense gradient).

    Returns
    -------
    dict
        ``"layers"``: one dict per layer (``active``, ``numel``, ``positions``,
        ``inference``, ``train``, ``dense_inference``, ``dense_train``, ``param_bytes``,
        ``dense_param_bytes``); ``"total"``: their sums and the ratios ``train_ratio``,
        ``inference_ratio`` and ``param_ratio`` (sparse over dense).
    """
    rows = []
    for layer, P in _positions(net, example).items():
        s, D = layer.num_active, layer.numel
        size = layer.mu.element_size()
        bias = 0 if layer.bias_mu is None else 2 * layer.bias_mu.numel() * size
        rows.append(
            {
                "layer": layer.extra_repr(),
                "active": s,
                "numel": D,
                "positions": P,
                "inference": 2 * s * P,
                "dense_inference": 2 * D * P,
                "train": 12 * s * P + (6 * D * P / update_every if s < D else 0.0),
                "dense_train": 12 * D * P,
                "param_bytes": (2 * size + layer.index.element_size()) * s + bias,
                "dense_param_bytes": 2 * size * D + bias,
            }
        )
    keys = (
        "inference",
        "dense_inference",
        "train",
        "dense_train",
        "param_bytes",
        "dense_param_bytes",
    )
    total = {k: sum(r[k] for r in rows) for k in keys}
    total["train_ratio"] = total["train"] / total["dense_train"]
    total["inference_ratio"] = total["inference"] / total["dense_inference"]
    total["param_ratio"] = total["param_bytes"] / total["dense_param_bytes"]
    return {"layers": rows, "total": total}

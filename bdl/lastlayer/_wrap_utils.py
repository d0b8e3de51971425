"""Helpers of :func:`bdl.lastlayer.wrap`: finding the last layer, checking it, batching data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from bdl.core.batches import call, output_tensor
from bdl.core.training import tensor_batches

__all__ = ["batch_source", "checked_features", "find_linear", "linear_names", "split_name"]

Batch = tuple[Tensor, Tensor]
_CHECK_RTOL = 1e-5


def linear_names(net: nn.Module) -> list[str]:
    """Dotted names of every ``nn.Linear`` in ``net``, in ``named_modules()`` order."""
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]


def find_linear(net: nn.Module, last_layer: str | None) -> tuple[str, nn.Linear]:
    """The dotted name and module of the layer to replace."""
    if last_layer is None:
        names = linear_names(net)
        if not names:
            raise ValueError(
                f"net ({type(net).__name__}) contains no nn.Linear module; wrap needs a final "
                "linear layer to replace (pass last_layer= naming it)"
            )
        return names[-1], net.get_submodule(names[-1])
    if not isinstance(last_layer, str):
        raise ValueError(
            f"last_layer must be a dotted module name, got {type(last_layer).__name__}"
        )
    try:
        module = net.get_submodule(last_layer)
    except AttributeError as err:
        raise ValueError(
            f"last_layer={last_layer!r} is not a submodule of net; its nn.Linear layers are "
            f"{linear_names(net)}"
        ) from err
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"last_layer={last_layer!r} is a {type(module).__name__}, not an nn.Linear; the "
            f"nn.Linear layers of net are {linear_names(net)}"
        )
    return last_layer, module


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.c"`` -> ``("a.b", "c")``."""
    parent, _, attr = name.rpartition(".")
    return parent, attr


def checked_features(
    extractor: nn.Module, reference_layer: nn.Linear, layer_name: str, x: Tensor
) -> Tensor:
    """Features of ``x``, checking that the original network's output is the replaced layer
    applied to them (i.e. that the layer is the network's last operation).

    The reference layer is put back in the extractor for one forward pass, with a hook that
    captures its input and output; the network's output must equal that output.
    """
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if args:
            captured["input"], captured["output"] = args[0], output

    candidates = linear_names(extractor)
    if layer_name not in candidates:
        candidates.append(layer_name)
    hint = f"pass last_layer= naming the final nn.Linear (candidates: {candidates})"
    handle = reference_layer.register_forward_hook(hook)
    try:
        if layer_name == "":
            out = reference_layer(x)
        else:
            parent_name, attr = split_name(layer_name)
            parent = extractor.get_submodule(parent_name)
            identity = getattr(parent, attr)
            setattr(parent, attr, reference_layer)
            try:
                out = call(extractor, x)
            finally:
                setattr(parent, attr, identity)
    finally:
        handle.remove()
    if "input" not in captured:
        raise ValueError(
            f"layer {layer_name!r} is not called (with a positional input) in the "
            f"network's forward pass; {hint}"
        )
    try:
        out = output_tensor(out)  # a record output (ModelOutput): its logits
    except ValueError as err:
        raise ValueError(
            f"the network returns a {type(out).__name__}, not a Tensor or a record with "
            "logits; wrap needs a network whose output is the output of its last nn.Linear"
        ) from err
    phi, expected = captured["input"], captured["output"]
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    same = out.numel() == expected.numel() and float(
        (out.reshape(expected.shape) - expected).abs().max()
    ) <= _CHECK_RTOL * max(scale, torch.finfo(expected.dtype).tiny)
    if not same:
        raise ValueError(
            f"the network's output is not the output of layer {layer_name!r}: that layer "
            f"is not the last operation of the network; {hint}"
        )
    if phi.dim() != 2:
        raise ValueError(
            f"the input of layer {layer_name!r} has shape {tuple(phi.shape)}; wrap needs "
            "features of shape (batch, d)"
        )
    return phi


def batch_source(
    data: torch.utils.data.DataLoader | Iterable[Batch] | tuple[Tensor, Tensor],
    batch_size: int,
    generator: torch.Generator | None,
    prepare: Callable[[Tensor, Tensor, str], Batch],
) -> Callable[[bool], Iterator[Batch]]:
    """A function ``shuffle -> iterator of (x, y)`` batches, each passed through ``prepare``.

    Tensor data are shuffled with ``generator`` (None: torch's global random state) when
    asked; a DataLoader (or any iterable of pairs) keeps its own batches and order.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor | Mapping):
        x, y = prepare(data[0], data[1], "data:")
        keys = list(x) if isinstance(x, Mapping) else None
        tensors = [x[k] for k in keys] + [y] if keys else [x, y]
        shuffled = tensor_batches(tensors, batch_size, generator)
        ordered = tensor_batches(tensors, batch_size, None, shuffle=False)

        def batches(shuffle: bool) -> Iterator[Batch]:
            for parts in (shuffled if shuffle else ordered)():
                yield (dict(zip(keys, parts[:-1], strict=True)), parts[-1]) if keys else parts

        return batches
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise ValueError(
            "data must be a DataLoader (or iterable) of (x, y) batches or a tuple (X, y) of "
            f"tensors, got {type(data).__name__}"
        )

    def loader_batches(shuffle: bool) -> Iterator[Batch]:  # the loader decides on shuffling
        for i, batch in enumerate(data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"data must yield (x, y) pairs; batch {i} is not one")
            yield prepare(batch[0], batch[1], f"data batch {i}:")

    return loader_batches

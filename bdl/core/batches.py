"""Network inputs that are mappings and outputs that are records (Hugging Face style).

A *batch* is either a tensor (e.g. ``input_ids`` of shape (b, t), or any network input whose
first dimension is the batch) or a mapping of names to tensors sharing their first dimension
(``input_ids``, ``attention_mask``, ``token_type_ids``, ...), as a tokenizer returns it; a
network is called with a mapping as keyword arguments. An output is a tensor, a tuple whose
first entry is the tensor, or a record with a ``logits`` field (a ``ModelOutput``).
Sequence-classification logits (b, C) are supported; token-level outputs (b, t, C) are refused
with a clear error by :func:`logits_of`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "batch_size",
    "call",
    "check_batch",
    "iterate_batches",
    "logits_of",
    "output_tensor",
    "repeat_batch",
    "slice_batch",
    "split_batch",
    "to_device",
]

Batch = Tensor | Mapping[str, Tensor]


def check_batch(batch: Batch, name: str = "X") -> Batch:
    """``batch`` if it is a tensor or a non-empty mapping of tensors with one batch size."""
    batch_size(batch, name)
    return batch


def _tensors(batch: Batch, name: str) -> dict[str, Tensor] | Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError(f"{name} is an empty mapping")
        bad = [k for k, v in batch.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"{name} must map names to tensors; not tensors: {bad}")
        return dict(batch)
    raise ValueError(
        f"{name} must be a tensor or a mapping of tensors (a tokenizer's output), got "
        f"{type(batch).__name__}"
    )


def batch_size(batch: Batch, name: str = "batch") -> int:
    """Rows of ``batch`` (the common first dimension of its tensors)."""
    t = _tensors(batch, name)
    sizes = {v.shape[0] for v in t.values()} if isinstance(t, dict) else {t.shape[0]}
    if len(sizes) != 1:
        raise ValueError(f"the tensors of {name} differ in their first dimension: {sorted(sizes)}")
    return sizes.pop()


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    return {k: v[start:stop] for k, v in batch.items()}


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Consecutive chunks of at most ``size`` rows."""
    n = batch_size(batch)
    return [slice_batch(batch, start, min(n, start + size)) for start in range(0, n, size)]


def repeat_batch(batch: Batch, times: int) -> Batch:
    """``batch`` stacked ``times`` times along the first dimension (sample-major order)."""
    if isinstance(batch, Tensor):
        return batch.repeat((times,) + (1,) * (batch.dim() - 1))
    return {k: v.repeat((times,) + (1,) * (v.dim() - 1)) for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def iterate_batches(
    data: Batch | Iterable[Batch], size: int, name: str = "data"
) -> Iterator[Batch]:
    """Chunks of at most ``size`` rows of one batch, or the batches of an iterable of them."""
    if isinstance(data, Tensor | Mapping):
        n = batch_size(data, name)
        for start in range(0, n, size):
            yield slice_batch(data, start, min(n, start + size))
        return
    for item in data:
        if isinstance(item, tuple | list) and item and isinstance(item[0], Tensor | Mapping):
            item = item[0]  # (inputs, labels) pairs: the labels are not used
        yield item


def output_tensor(output: Any) -> Tensor:
    """The tensor of a network output: itself, its ``logits`` field, or a tuple's first entry."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"cannot find a tensor (or logits) in a network output of type {type(output).__name__}"
    )


def logits_of(output: Any) -> Tensor:
    """The logits (b, C) of a model output (see :func:`output_tensor`)."""
    logits = output_tensor(output)
    if logits.dim() != 2:
        raise ValueError(
            f"expected sequence-classification logits of shape (batch, classes), got "
            f"{tuple(logits.shape)} (token-level outputs are not supported)"
        )
    return logits


def call(model: nn.Module, batch: Batch) -> Any:
    """``model`` applied to ``batch`` (keyword arguments for a mapping); its raw output."""
    if isinstance(batch, Tensor):
        return model(batch)
    return model(**batch)

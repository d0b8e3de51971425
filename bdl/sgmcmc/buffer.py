"""A fixed-capacity store of a chain's past states (ring buffer or reservoir)."""

from __future__ import annotations

import torch
from torch import Tensor

from bdl.core.validation import check_choice, check_int

__all__ = ["ChainBuffer"]


class ChainBuffer:
    """Fixed-capacity store of flat parameter vectors: ring buffer or reservoir.

    ``mode="ring"`` keeps the newest ``capacity`` pushes; ``mode="reservoir"`` keeps a
    uniform random subset of all pushes (Vitter's algorithm R: push number ``n``, counted
    from 0, replaces slot ``j ~ U{0..n}`` if ``j < capacity``), so after ``n`` pushes every
    one is stored with probability ``capacity / n``.

    Parameters
    ----------
    capacity : int
        Number of slots ``S``.
    dim : int
        Length ``D`` of a pushed vector.
    mode : {"ring", "reservoir"}
    dtype, device
        Of the storage, shape ``(S, D)``.
    generator : torch.Generator, optional
        Source of the reservoir's slot draws (on ``generator.device``).
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        mode: str = "ring",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.capacity = check_int("buffer_size", capacity)
        self.mode = check_choice("buffer", mode, ("ring", "reservoir"))
        self.generator = generator
        self.data = torch.zeros(self.capacity, check_int("dim", dim), dtype=dtype, device=device)
        self.stamps = torch.full((self.capacity,), -1, dtype=torch.long)
        self.num_pushed = 0

    def __len__(self) -> int:
        """Number of stored entries, ``min(num_pushed, capacity)``."""
        return min(self.num_pushed, self.capacity)

    @property
    def samples(self) -> Tensor:
        """The stored vectors, shape ``(len(self), D)`` (a view; slot order, not time order)."""
        return self.data[: len(self)]

    @property
    def steps(self) -> Tensor:
        """Push number (0-based) of every stored entry, shape ``(len(self),)``."""
        return self.stamps[: len(self)]

    def push(self, x: Tensor) -> None:
        """Store a copy of ``x`` (shape ``(D,)``) according to the mode."""
        n = self.num_pushed
        if n < self.capacity or self.mode == "ring":
            slot: int | None = n % self.capacity
        else:
            device = self.generator.device if self.generator is not None else "cpu"
            j = int(torch.randint(n + 1, (1,), generator=self.generator, device=device).item())
            slot = j if j < self.capacity else None
        if slot is not None:
            self.data[slot].copy_(x)
            self.stamps[slot] = n
        self.num_pushed = n + 1

    def reset(self) -> None:
        """Forget every entry."""
        self.num_pushed = 0
        self.stamps.fill_(-1)

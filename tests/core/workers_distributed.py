"""Worker functions for the launcher tests of ``bdl.core.distributed.spawn``, in a module that
imports nothing heavy (each spawned process imports it)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def crash(kind: str) -> None:
    """Rank 1 fails (raises, or exits with code 3) while rank 0 waits in a collective."""
    if dist.get_rank() == 1:
        if kind == "raise":
            raise ValueError("rank 1 failed on purpose")
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def sleep_forever() -> None:
    time.sleep(600)

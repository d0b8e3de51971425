"""Start a process group on this machine: :func:`spawn` (re-exported by
:mod:`bdl.core.distributed`), for notebooks, tests and benchmarks; ``torchrun`` does the same
from a shell."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from bdl.core.validation import check_int, check_positive

__all__ = ["free_port", "spawn"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _target(fn: Callable[..., Any]) -> tuple[str, str, str | None]:
    """How a child process finds ``fn``: its module, qualified name and source file."""
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise ValueError(
            "fn must be a function defined at the top level of a module (not a lambda or a "
            f"nested function), got {fn!r}"
        )
    code = getattr(fn, "__code__", None)
    return fn.__module__, fn.__qualname__, None if code is None else code.co_filename


def _resolve(module: str, qualname: str, filename: str | None) -> Callable[..., Any]:
    """``fn`` in the child: imported by module name, else loaded from its file (a test module
    under pytest's importlib mode, or a script, has no importable name)."""
    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        if filename is None or not Path(filename).is_file():
            raise
    spec = importlib.util.spec_from_file_location(f"_bdl_spawn_{Path(filename).stem}", filename)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {filename}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    obj = loaded
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(
    rank: int,
    target: tuple[str, str, str | None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    threads: int | None,
    out_dir: str,
) -> None:
    """One rank: join the group, run the function, save its result, leave the group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
    )  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    fn = _resolve(*target)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )  # fmt: skip
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        result = fn(*args, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _failure(context: Any, out_dir: str) -> str:
    """Every rank's exit code and the traceback of every rank that raised."""
    lines = ["a worker process failed; the others were terminated"]
    for rank, process in enumerate(context.processes):
        code = process.exitcode
        lines.append(
            f"rank {rank}: exit code {code}" + (" (terminated)" if code in (-9, -15) else "")
        )
    for rank in range(len(context.processes)):
        err = Path(out_dir) / f"rank{rank}.err"
        if err.is_file():
            lines += [f"-- rank {rank} raised:", err.read_text().rstrip()]
    return "\n".join(lines)


def spawn(
    fn: Callable[..., Any],
    nprocs: int = 2,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    join_timeout: float | None = None,
    threads: int | None = 1,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` new local processes in one process group.

    Each process joins a group over TCP on 127.0.0.1 (a free port), runs the function with the
    default group initialised (rank and size from ``torch.distributed``, or the environment
    variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` torchrun would set), and leaves the
    group; the same function runs unchanged under ``torchrun`` after
    ``init_process_group``. A worker that raises or dies ends the others and raises here.

    Parameters
    ----------
    fn : callable
        A function at the top level of a module or script (found by the children by module
        name, or loaded from its file, e.g. a test module under pytest's importlib mode).
    nprocs : int, default 2
        Number of processes (ranks).
    args, kwargs
        Passed to ``fn`` on every rank (pickled).
    backend : {"gloo", "nccl"}, default "gloo"
        ``"nccl"``: rank ``r`` uses CUDA device ``r`` (modulo the device count).
    timeout : float, default 60
        Seconds a collective waits for the other ranks before raising (the group's timeout).
    join_timeout : float, optional
        Seconds to wait for all processes before terminating them and raising TimeoutError
        (None: no limit).
    threads : int or None, default 1
        ``torch.set_num_threads`` in every process (None: torch's default; one per process
        avoids oversubscribing the cores).

    Returns
    -------
    list
        The return value of every rank, in rank order (saved with ``torch.save`` and loaded
        here: tensors, numbers, containers of them, and objects of importable classes).

    Raises
    ------
    RuntimeError
        A worker raised or died: the others were terminated; the message lists every rank's
        exit code and the traceback of every rank that raised (the
        ``torch.multiprocessing.ProcessException`` of the first failure seen is its cause).
    TimeoutError
        ``join_timeout`` passed.
    """
    nprocs = check_int("nprocs", nprocs)
    timeout = check_positive("timeout", timeout)
    if join_timeout is not None:
        join_timeout = check_positive("join_timeout", join_timeout)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    target = _target(fn)
    with tempfile.TemporaryDirectory(prefix="bdl_spawn_") as out_dir:
        worker_args = (
            target, tuple(args), dict(kwargs or {}), nprocs, free_port(), backend, timeout,
            threads, out_dir,
        )  # fmt: skip
        context = mp.start_processes(
            _worker, args=worker_args, nprocs=nprocs, join=False, start_method="spawn"
        )
        deadline = None if join_timeout is None else time.monotonic() + join_timeout
        try:
            while not context.join(timeout=0.1):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {nprocs} processes did not finish within join_timeout="
                        f"{join_timeout:g} s; they were terminated"
                    )
        except ProcessException as err:
            raise RuntimeError(_failure(context, out_dir)) from err
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [
            torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)
        ]

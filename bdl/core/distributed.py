r"""Data-parallel training on :mod:`torch.distributed`, and the collectives the library uses.

The library uses an initialised default process group (``torchrun`` followed by
``torch.distributed.init_process_group``, or :func:`spawn`) in two ways:

- **data parallel** (this module): inside ``with data_parallel():`` the one training loop,
  :func:`bdl.core.training.train`, and with it every ``fit`` that trains through it (VBLL
  heads and networks, wrapped networks, SVGP, SWSGP, SSVI, the SG-MCMC estimators), runs on
  all ranks together, so that ``P`` ranks take the steps one process takes with the same
  global minibatch;
- **many chains** (:mod:`bdl.sgmcmc.chains`): outside ``data_parallel``, an SG-MCMC
  estimator's ``fit`` runs one independent chain per rank and gathers all of them.

The data-parallel design, in four rules:

1. *Replicated data, sharded minibatches.* Every rank calls ``fit`` with the same full
   training data and the same seed, so every rank knows the global size ``N`` (the ELBO's
   ``1 / N`` KL weight, SG-MCMC's ``num_data``) and draws the same minibatch order. The loop
   gives rank ``r`` a contiguous slice of ``n_r`` of each global minibatch of ``B`` points
   (:func:`shard_bounds`): the forward and backward passes are split ``P`` ways.
2. *Exact global gradients.* Rank ``r`` scales its mean minibatch loss by
   ``w_r = P n_r / B`` before ``backward``, and the gradients are then averaged over the
   ranks (:func:`allreduce_gradients`, one all-reduce per dtype and device and step), so each
   rank holds :math:`\sum_r \frac{n_r}{B} \nabla \bar L_r = \nabla \bar L_B`, the gradient of
   the global minibatch's mean loss, also when ``P`` does not divide ``B``. A term that is the
   same on every rank (a KL divided by ``N``, a prior) keeps its weight since
   :math:`\sum_r n_r / B = 1`. Clipping and the optimizer step then run on identical
   gradients, so the parameters stay identical on every rank.
3. *One start.* The optimised parameters are broadcast from rank 0 when the loop starts
   (as ``DistributedDataParallel`` does at construction); everything else (the network
   built by ``fit``, an SSVI support, BatchNorm statistics) is identical because the seed
   is (the estimators agree on rank 0's seed, :func:`agreed_seed`).
4. *Per-rank noise inside the loss, shared noise outside it.* Random draws inside the loss
   (local reparameterisation, Monte Carlo likelihoods, dropout) come from torch's global
   generators, which the loop forks and reseeds per rank for its duration, so ranks do not
   repeat each other's draws; explicit generators (the minibatch order, SG-MCMC's injected
   noise) are untouched and therefore identical on every rank: the noise of a Langevin step
   is drawn once, the same everywhere.

Losses that are not means over data points (an exact GP's marginal likelihood) are not
sharded: only batch sources that declare their data dimensions (:func:`tensor_batches
<bdl.core.training.tensor_batches>` does, or mark one with :func:`shardable
<bdl.core.training.shardable>`) are split; any other batch is computed whole on every rank
(correct, without a speed-up).

Outside a process group every function here is a no-op (world size 1).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bdl.core._spawn import free_port, spawn
from bdl.core.validation import check_int

__all__ = [
    "DataParallel",
    "active",
    "agreed_seed",
    "all_gather_rows",
    "allreduce_gradients",
    "average_batch_tensors",
    "broadcast_int",
    "broadcast_parameters",
    "data_parallel",
    "free_port",
    "get_rank",
    "get_world_size",
    "is_initialized",
    "shard",
    "shard_bounds",
    "spawn",
]

Group = Any  # a torch.distributed ProcessGroup (None: the default group)

_ACTIVE: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar(
    "bdl_data_parallel", default=None
)
#: multiplier separating the per-rank seeds of the global generators (a 64-bit odd constant)
_RANK_SEED_STRIDE = 0x9E3779B97F4A7C15


# -- the process group ------------------------------------------------------------------------
def is_initialized() -> bool:
    """Whether torch.distributed is available and its default process group initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 outside a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Group = None) -> int:
    """Number of ranks in ``group`` (1 outside a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def _comm_device(tensor: Tensor, group: Group) -> torch.device:
    """Where a collective on ``tensor`` runs: NCCL needs CUDA tensors, gloo takes any."""
    if tensor.device.type != "cuda" and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _all_reduce(flat: Tensor, group: Group) -> Tensor:
    """Sum ``flat`` over the ranks (a new tensor on ``flat``'s device)."""
    work = flat.to(_comm_device(flat, group), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(flat.device)


def _buckets(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """``tensors`` (each once, in order) grouped by device and dtype."""
    seen: set[int] = set()
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets


# -- collectives ------------------------------------------------------------------------------
def allreduce_gradients(params: Iterable[Tensor], group: Group = None) -> None:
    """Average the gradients of ``params`` over the ranks, in place (a ``grad_hook``).

    One all-reduce per dtype and device moves every gradient together with a has-gradient flag
    per parameter: a parameter without a gradient on some ranks counts as zero there, and one
    without a gradient on every rank keeps ``grad = None`` (so optimizers still skip it). This
    is what :func:`bdl.core.training.train` calls under :func:`data_parallel`; pass it as
    ``train(..., grad_hook=allreduce_gradients)`` in a loop that shards its data itself, or
    call it between ``backward()`` and ``opt.step()`` in your own loop. A no-op with one rank.

    Parameters
    ----------
    params : iterable of Tensor
        Dense parameters (every rank passes them in the same order).
    group : ProcessGroup, optional
        Default: the default group.

    Raises
    ------
    ValueError
        For a sparse gradient.
    """
    world = get_world_size(group)
    if world == 1:
        return
    for (device, dtype), ps in _buckets(params).items():
        parts, flags = [], []
        for p in ps:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("allreduce_gradients does not support sparse gradients")
            has = p.grad is not None
            parts.append(
                p.grad.reshape(-1) if has else torch.zeros(p.numel(), dtype=dtype, device=device)
            )
            flags.append(1.0 if has else 0.0)
        parts.append(torch.tensor(flags, dtype=dtype, device=device))
        total = _all_reduce(torch.cat(parts), group)
        grads, counts = total[: -len(ps)].div_(world), total[-len(ps) :].tolist()
        for p, g, count in zip(ps, grads.split([p.numel() for p in ps]), counts, strict=True):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = g.view_as(p).clone()
            else:
                p.grad.copy_(g.view_as(p))


@torch.no_grad()
def broadcast_parameters(tensors: Iterable[Tensor], src: int = 0, group: Group = None) -> None:
    """Overwrite ``tensors`` on every rank with their values on rank ``src`` (in place).

    One broadcast per dtype and device; a no-op with one rank.
    """
    if get_world_size(group) == 1:
        return
    for ts in _buckets(tensors).values():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        work = flat.to(_comm_device(flat, group), copy=True)
        dist.broadcast(work, src=src, group=group)
        for t, part in zip(ts, work.to(flat.device).split([t.numel() for t in ts]), strict=True):
            t.copy_(part.view_as(t))


def broadcast_int(value: int, src: int = 0, group: Group = None) -> int:
    """Rank ``src``'s ``value`` on every rank (``value`` itself with one rank)."""
    if get_world_size(group) == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    work = t.to(_comm_device(t, group))
    dist.broadcast(work, src=src, group=group)
    return int(work.item())


def all_gather_rows(tensor: Tensor, group: Group = None) -> list[Tensor]:
    """Every rank's ``tensor`` (rank order), on every rank; lengths along dim 0 may differ.

    Parameters
    ----------
    tensor : Tensor, shape (n_r, ...)
        The same trailing shape and dtype on every rank.

    Returns
    -------
    list of Tensor
        ``world_size`` tensors of shapes ``(n_r, ...)``, on ``tensor``'s device.
    """
    world = get_world_size(group)
    if world == 1:
        return [tensor]
    device = _comm_device(tensor, group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), *tensor.shape[1:], dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:n].to(tensor.device) for o, n in zip(out, lengths, strict=True)]


# -- sharding ---------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items.

    The first ``n % world_size`` ranks get ``n // world_size + 1`` items, the others
    ``n // world_size`` (possibly none), in rank order.
    """
    world_size = check_int("world_size", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(int(n), world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(
    tensors: Sequence[Tensor],
    rank: int | None = None,
    world_size: int | None = None,
    *,
    dim: int = 0,
) -> tuple[Tensor, ...]:
    """Rank ``rank``'s contiguous share of equally long ``tensors`` (views along ``dim``).

    For loops that keep only their shard of the data in memory (pass the global ``N`` as
    ``num_data`` and average gradients with :func:`allreduce_gradients`); ``fit`` under
    :func:`data_parallel` shards every minibatch itself.

    Parameters
    ----------
    tensors : sequence of Tensor
        Of equal length along ``dim``.
    rank, world_size : int, optional
        Default: this process's rank and the world size of the default group.
    dim : int, default 0
        The data dimension.

    Returns
    -------
    tuple of Tensor
        Slices ``[start, stop)`` of :func:`shard_bounds`.
    """
    if isinstance(tensors, Tensor) or not tensors:
        raise ValueError("tensors must be a non-empty sequence of tensors")
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    n = tensors[0].shape[dim]
    for t in tensors:
        if t.shape[dim] != n:
            raise ValueError(f"tensors differ in length along dim {dim}: {n} and {t.shape[dim]}")
    start, stop = shard_bounds(n, rank, world_size)
    return tuple(t.narrow(dim, start, stop - start) for t in tensors)


# -- data parallel ----------------------------------------------------------------------------
class DataParallel:
    """The state of a :func:`data_parallel` block: its group and the current minibatch's share.

    Attributes
    ----------
    group : ProcessGroup or None
    rank, world_size : int
    shard_batches : bool
        Whether the training loop splits minibatches (else every rank computes them whole).
    weight : float
        ``P n_r / B`` of the current minibatch (1 when it is not split).
    local_size : int or None
        ``n_r``, the data points of the current minibatch this rank computes (None: not split).
    """

    def __init__(self, group: Group, shard_batches: bool) -> None:
        self.group = group
        self.rank = get_rank(group)
        self.world_size = get_world_size(group)
        self.shard_batches = bool(shard_batches)
        self.weight = 1.0
        self.local_size: int | None = None

    def shard(self, batch: tuple[Any, ...], dims: int | Sequence[int] | None) -> tuple[Any, ...]:
        """This rank's slice of a global minibatch ``batch`` whose data dims are ``dims``.

        A rank whose share is empty (``B < P``) computes the first point with weight 0.
        """
        self.weight, self.local_size = 1.0, None
        if not self.shard_batches or dims is None or not batch:
            return batch
        if not all(isinstance(t, Tensor) for t in batch):
            return batch
        dims = [dims] * len(batch) if isinstance(dims, int) else list(dims)
        total = batch[0].shape[dims[0]]
        if total == 0 or len(dims) != len(batch):
            return batch
        start, stop = shard_bounds(total, self.rank, self.world_size)
        self.local_size = stop - start
        self.weight = self.world_size * self.local_size / total
        if stop == start:
            start, stop = 0, 1
        return tuple(t.narrow(d, start, stop - start) for t, d in zip(batch, dims, strict=True))

    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        """:func:`allreduce_gradients` over this block's group."""
        allreduce_gradients(params, self.group)

    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Batch-weighted average over the ranks of per-rank minibatch means (new tensors):
        :math:`\\sum_r (n_r / B) t_r`, the value on the global minibatch."""
        if self.world_size == 1:
            return list(tensors)
        out = []
        for t in tensors:
            out.append(_all_reduce(t.detach() * self.weight, self.group).div_(self.world_size))
        return out

    def sum_scalars(self, *values: float | Tensor) -> list[float]:
        """Each value summed over the ranks (one all-reduce in float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return _all_reduce(flat, self.group).tolist()

    @contextlib.contextmanager
    def rank_generators(self, devices: Iterable[torch.device] = ()) -> Iterator[None]:
        """Torch's global generators (CPU and the CUDA ``devices``) forked and reseeded from
        their initial seed and the rank for the block (restored after); nothing with one rank."""
        if self.world_size == 1:
            yield
            return
        cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        seed = (torch.initial_seed() + _RANK_SEED_STRIDE * (self.rank + 1)) % 2**63
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield

    def __repr__(self) -> str:
        return (
            f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
            f"shard_batches={self.shard_batches})"
        )


@contextlib.contextmanager
def data_parallel(group: Group = None, *, shard_batches: bool = True) -> Iterator[DataParallel]:
    """Train data-parallel over the ranks of ``group`` inside the block (module docstring).

    Every rank enters the block and calls the same ``fit`` with the same full data and seed;
    :func:`bdl.core.training.train` then shards the minibatches, averages the gradients and
    keeps the parameters identical on every rank. The SG-MCMC estimators run one chain whose
    gradients are averaged (instead of one chain per rank).

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: the default group (which must be initialised).
    shard_batches : bool, default True
        Split every minibatch across the ranks. ``False``: every rank computes the batches it
        is given (e.g. its own shard of the data) and only the gradients are averaged; then
        ``N`` in the objectives is the size of the data each rank passes.

    Yields
    ------
    DataParallel
        The block's state.

    Raises
    ------
    RuntimeError
        If torch.distributed has no initialised process group.

    Examples
    --------
    Under ``torchrun --nproc-per-node 2 script.py``::

        torch.distributed.init_process_group("gloo")
        with bdl.core.distributed.data_parallel():
            model.fit((X, y), seed=0)        # the same X, y and seed on every rank
    """
    if not is_initialized():
        raise RuntimeError(
            "data_parallel needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment)"
        )
    state = DataParallel(group, shard_batches)
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def active() -> DataParallel | None:
    """The innermost :func:`data_parallel` block's state, or None outside one."""
    return _ACTIVE.get()


def average_batch_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Per-rank minibatch means (e.g. gradients taken outside the loop's backward, as SSVI's
    growth criterion) turned into the global minibatch's values under :func:`data_parallel`
    (:meth:`DataParallel.average`); the tensors themselves otherwise."""
    state = active()
    return list(tensors) if state is None else state.average(tensors)


def agreed_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank under :func:`data_parallel` (``seed`` otherwise), so
    that a ``fit`` drawing its seed at random builds the same model everywhere."""
    state = active()
    return int(seed) if state is None else broadcast_int(seed, 0, state.group)

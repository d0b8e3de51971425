"""The one minibatch training loop every model and estimator trains through.

:func:`train` runs epochs of ``zero_grad / loss / backward / [grad hook] / [clip] / step``
over batches from a callable, with any number of optimizers (e.g. natural gradients for
variational parameters beside Adam for hyperparameters), gradient accumulation, per-step
hooks (schedules, sample collection), early stopping through an epoch callback and an
optional tqdm bar (off by default). ``grad_hook`` is where data-parallel training
all-reduces gradients: inside :func:`bdl.core.distributed.data_parallel` the loop itself
shards every minibatch over the ranks and averages the gradients (see that module).
:func:`minimize_lbfgs` is the full-batch alternative for small, smooth problems.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdl.core import distributed
from bdl.core.validation import check_int

__all__ = [
    "EarlyStopping",
    "minimize_lbfgs",
    "seeded",
    "seeded_generator",
    "shardable",
    "shuffled_batches",
    "tensor_batches",
    "train",
    "training_mode",
]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed when ``None``)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Torch's global generators (CPU, and ``device`` if it is CUDA) seeded with ``seed``
    inside the block and restored after it: draws inside (initialisations, dropout masks) are
    reproducible and the caller's random state is untouched. ``seed=None``: no change."""
    if seed is None:
        yield
        return
    device = torch.device("cpu") if device is None else torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def training_mode(module: nn.Module | None, training: bool = True) -> Iterator[None]:
    """``module`` and every submodule in train (or eval) mode, each flag restored after."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator | None, device: torch.device
) -> Iterator[Tensor]:
    """Index tensors of a random partition of ``range(n)`` into batches of ``batch_size``."""
    order = torch.randperm(n, generator=generator).to(device)
    return iter(order.split(batch_size))


def tensor_batches(
    tensors: Sequence[Tensor],
    batch_size: int,
    generator: torch.Generator | None,
    *,
    dims: int | Sequence[int] = 0,
    shuffle: bool = True,
) -> Callable[[], Iterator[tuple[Tensor, ...]]]:
    """A batch source for :func:`train`: the same random minibatch of every tensor.

    Parameters
    ----------
    tensors : sequence of Tensor
        Equally long along their data dimension.
    batch_size : int
        Clamped to the data size.
    generator : torch.Generator or None
        Source of each epoch's permutation.
    dims : int or sequence of int, default 0
        Data dimension of each tensor (one int for all), e.g. ``(-2, -1)`` for ``X`` of
        shape ``(..., N, d)`` and ``y`` of shape ``(..., N)`` of a batch of GPs.
    shuffle : bool, default True
        A fresh permutation per epoch (otherwise the data order).

    Returns
    -------
    callable
        Each call returns an iterator over one epoch's tuples of tensors. Its ``dims``
        attribute marks it :func:`shardable` along ``dims`` (data-parallel training).
    """
    dims = [dims] * len(tensors) if isinstance(dims, int) else list(dims)
    if len(dims) != len(tensors):
        raise ValueError(f"dims must give one dimension per tensor, got {len(dims)}")
    n = tensors[0].shape[dims[0]]
    for t, d in zip(tensors, dims, strict=True):
        if t.shape[d] != n:
            raise ValueError(
                f"tensors differ in length along their data dims: {n} and {t.shape[d]}"
            )
    batch_size = min(check_int("batch_size", batch_size), n)
    device = tensors[0].device

    def epoch() -> Iterator[tuple[Tensor, ...]]:
        if shuffle:
            order = shuffled_batches(n, batch_size, generator, device)
        else:
            order = iter(torch.arange(n, device=device).split(batch_size))
        for idx in order:
            yield tuple(t.index_select(d, idx) for t, d in zip(tensors, dims, strict=True))

    return shardable(epoch, dims)


BatchSource = Callable[[], Iterable[tuple[Tensor, ...]]]


def shardable(batches: BatchSource, dims: int | Sequence[int] = 0) -> BatchSource:
    """Mark a batch source for :func:`train` as a mean over data points along ``dims``.

    Under :func:`bdl.core.distributed.data_parallel`, :func:`train` splits the minibatches of
    a marked source across the ranks (each computes a contiguous slice along ``dims``); an
    unmarked source's batches are computed whole on every rank. :func:`tensor_batches` marks
    its sources itself.

    Parameters
    ----------
    batches : callable
        Returns an iterable of tuples of tensors each epoch.
    dims : int or sequence of int, default 0
        Data dimension of each tensor of a batch (one int for all).

    Returns
    -------
    callable
        ``batches`` itself, with the attribute ``dims`` set (a wrapper if it cannot hold one).
    """
    try:
        batches.dims = dims  # type: ignore[attr-defined]
        return batches
    except AttributeError:

        def wrapped() -> Iterable[tuple[Tensor, ...]]:
            return batches()

        wrapped.dims = dims  # type: ignore[attr-defined]
        return wrapped


class EarlyStopping:
    """Keeps the best state of ``module`` by a validation score; stops after ``patience``.

    Call it at the end of every epoch with that epoch's score (lower is better); it returns
    True when training should stop. :meth:`restore` loads the best state back.
    """

    def __init__(self, module: nn.Module, patience: int) -> None:
        self.module = module
        self.patience = check_int("patience", patience)
        self.best_score = float("inf")
        self.best_state: dict[str, Tensor] | None = None
        self.since_best = 0
        self.scores: list[float] = []

    def __call__(self, score: float) -> bool:
        self.scores.append(float(score))
        if score < self.best_score:
            self.best_score = float(score)
            self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.since_best = 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self) -> None:
        """Load the best state seen (no-op if no score was given)."""
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)


def _params_of(optimizers: Sequence[torch.optim.Optimizer]) -> list[Tensor]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def train(
    loss_fn: Callable[..., Tensor],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    batches: Callable[[], Iterable[tuple[Tensor, ...]]],
    epochs: int,
    *,
    max_grad_norm: float | None = None,
    accumulate: int = 1,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    grad_hook: Callable[[list[Tensor]], None] | None = None,
    end_of_epoch: Callable[[int, float], bool] | None = None,
    batch_len: Callable[[tuple[Tensor, ...]], int] | None = None,
    module: nn.Module | None = None,
    verbose: bool = False,
    desc: str = "fit",
) -> list[float]:
    """Minimise a per-datum loss by minibatch stochastic optimisation.

    Gradients are enabled for the duration (so it also runs inside ``torch.no_grad()``), and
    ``module``, if given, is in train mode (every flag restored afterwards).

    Parameters
    ----------
    loss_fn : callable
        Maps one batch's tensors to a scalar per-datum loss (a mean over the batch).
    optimizers : Optimizer or sequence of Optimizer
        Stepped in order after every ``accumulate`` batches.
    batches : callable
        Returns a fresh iterable of tuples of tensors each epoch (:func:`tensor_batches`).
    epochs : int
        Passes over the data (0: no training).
    max_grad_norm : float, optional
        Clip the gradient norm of all optimised parameters (None: no clipping).
    accumulate : int, default 1
        Batches whose gradients are summed (each loss weighted by ``1 / accumulate``)
        before one optimizer step.
    before_step, after_step : callable, optional
        Called before and after each optimizer step (step-size schedules, sample
        collection).
    grad_hook : callable, optional
        Receives the list of optimised parameters after backward, before clipping and
        stepping (e.g. :func:`bdl.core.distributed.allreduce_gradients` in a loop over each
        rank's own shard of the data). Under :func:`~bdl.core.distributed.data_parallel` the
        loop averages the gradients over the ranks before calling it.
    end_of_epoch : callable, optional
        ``end_of_epoch(epoch, mean_loss)``; returning True stops training (early stopping).
    batch_len : callable, optional
        Number of data points in a batch, for the epoch's weighted mean loss (default: the
        first tensor's leading size; a batch of GPs with ``X (..., n, d)`` passes
        ``lambda b: b[0].shape[-2]``).
    module : nn.Module, optional
        Put in train mode for the duration.
    verbose : bool, default False
        Show a tqdm progress bar with the running loss.
    desc : str
        Label of the progress bar.

    Returns
    -------
    list of float
        Mean training loss of each epoch (weighted by batch size; one device sync per epoch;
        under data-parallel training the mean over every rank's points).

    Notes
    -----
    Inside :func:`bdl.core.distributed.data_parallel` (every rank calls ``train`` with the
    same batch source): the optimised parameters are broadcast from rank 0 first; each
    minibatch of a :func:`shardable` source is split into contiguous per-rank slices of
    ``n_r`` of its ``B`` points, the rank's loss scaled by ``P n_r / B`` and the gradients
    averaged over the ``P`` ranks (the global minibatch's gradient); torch's global
    generators are reseeded per rank for the duration (restored after).

    Raises
    ------
    RuntimeError
        If the loss of an epoch is NaN or inf (with the epoch's index).
    """
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    check_int("epochs", epochs, minimum=0)
    accumulate = check_int("accumulate", accumulate)
    params = _params_of(optimizers)
    history: list[float] = []
    parallel = distributed.active()
    if parallel is not None:
        distributed.broadcast_parameters(params, 0, parallel.group)
        grad_hook = _parallel_hook(parallel, grad_hook)
        dims = getattr(batches, "dims", None)
        generators = parallel.rank_generators({p.device for p in params})
    else:
        generators = contextlib.nullcontext()
    bar = tqdm(range(epochs), desc=desc, disable=not verbose, leave=False)
    with torch.enable_grad(), training_mode(module, True), generators:
        for epoch in bar:
            total, count, pending = None, 0, 0
            for batch in batches():
                if pending == 0:
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                if parallel is None:
                    loss = loss_fn(*batch)
                    (loss / accumulate if accumulate > 1 else loss).backward()
                else:
                    batch = parallel.shard(batch, dims)
                    loss = loss_fn(*batch)
                    (loss * (parallel.weight / accumulate)).backward()
                pending += 1
                if pending == accumulate:
                    _step(optimizers, params, max_grad_norm, before_step, after_step, grad_hook)
                    pending = 0
                if parallel is not None and parallel.local_size is not None:
                    size = parallel.local_size
                else:
                    size = batch[0].shape[0] if batch_len is None else batch_len(batch)
                weighted = loss.detach() * size
                total = weighted if total is None else total + weighted
                count += size
            if pending:
                _step(optimizers, params, max_grad_norm, before_step, after_step, grad_hook)
            if parallel is not None:
                total, count = parallel.sum_scalars(0.0 if total is None else total, count)
                total = None if count == 0 else total
            mean_loss = float(total) / max(count, 1) if total is not None else float("nan")
            if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
                raise RuntimeError(
                    f"the training loss became {mean_loss} in epoch {epoch}; lower the learning "
                    "rate or check the data for extreme values"
                )
            history.append(mean_loss)
            if verbose:
                bar.set_postfix(loss=f"{mean_loss:.4g}")
            if end_of_epoch is not None and end_of_epoch(epoch, mean_loss):
                break
    return history


def _parallel_hook(
    parallel: distributed.DataParallel, grad_hook: Callable[[list[Tensor]], None] | None
) -> Callable[[list[Tensor]], None]:
    """Average the gradients over the ranks, then run the user's ``grad_hook``."""

    def hook(params: list[Tensor]) -> None:
        parallel.reduce_gradients(params)
        if grad_hook is not None:
            grad_hook(params)

    return hook


def _step(
    optimizers: Sequence[torch.optim.Optimizer],
    params: list[Tensor],
    max_grad_norm: float | None,
    before_step: Callable[[], None] | None,
    after_step: Callable[[], None] | None,
    grad_hook: Callable[[list[Tensor]], None] | None,
) -> None:
    if grad_hook is not None:
        grad_hook(params)
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(params, max_grad_norm)
    if before_step is not None:
        before_step()
    for opt in optimizers:
        opt.step()
    if after_step is not None:
        after_step()


def minimize_lbfgs(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    max_iter: int = 500,
    max_eval: int | None = None,
    lr: float = 1.0,
    tolerance_grad: float = 1e-9,
    tolerance_change: float = 1e-12,
    module: nn.Module | None = None,
    verbose: bool = False,
    desc: str = "lbfgs",
) -> list[float]:
    """Full-batch L-BFGS with a strong-Wolfe line search on ``loss_fn()``.

    Gradients are enabled for the duration; ``module``, if given, is in train mode.

    Parameters
    ----------
    loss_fn : callable
        Computes the scalar objective from the current parameters.
    params : sequence of Tensor
        Parameters to optimise.
    max_iter : int
        Maximum number of L-BFGS iterations.
    max_eval : int, optional
        Maximum number of objective evaluations (default ``max_iter``).

    Returns
    -------
    list of float
        The objective at every evaluation.
    """
    params = list(params)
    history: list[float] = []
    if not params or max_iter == 0:
        return history
    opt = torch.optim.LBFGS(
        params, lr=lr, max_iter=max_iter, max_eval=max_eval or max_iter,
        tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )  # fmt: skip
    with tqdm(total=max_eval or max_iter, desc=desc, disable=not verbose, leave=False) as bar:

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            if not bool(torch.isfinite(loss)):
                raise RuntimeError(f"the objective became {float(loss)} during L-BFGS")
            loss.backward()
            history.append(float(loss.detach()))
            bar.update(1)
            return loss

        with torch.enable_grad(), training_mode(module, True):
            opt.step(closure)
    return history

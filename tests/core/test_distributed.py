"""Data-parallel training on torch.distributed: sharding, the loop's all-reduce, and two-rank
runs on loopback (gloo) against single-process training with the same global minibatches.

The two-rank runs share one :func:`bdl.core.distributed.spawn` (a module fixture): every task
below runs once on each of two ranks inside ``data_parallel()`` and once here without it.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gpytorch.kernels import RBFKernel, ScaleKernel
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from workers_distributed import crash, sleep_forever

from bdl.core import distributed
from bdl.core.training import shardable, tensor_batches, train
from bdl.lastlayer import VBLLNetwork, VBLLRegression, wrap
from bdl.sgmcmc import SGLD, SGMCMCRegressor
from bdl.ssvi import sparsify
from gp.sparse import SVGP, SWSGP, select_inducing_points

DT = torch.float64
N, BATCH = 41, 8  # batches of 8, 8, 8, 8, 8, 1: the last leaves rank 1 an empty share


def _data(n: int = N, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen, dtype=DT) * 4 - 2
    return X, torch.sin(X).sum(-1) + 0.1 * torch.randn(n, generator=gen, dtype=DT)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- tasks: each runs under data_parallel on two ranks and plainly in this process ----------
def task_sgld_chain() -> dict:
    """An SGLD chain through the loop: every state, the epoch losses."""
    X, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    noise = torch.Generator().manual_seed(5)
    opt = SGLD(net.parameters(), lr=1e-2, num_data=N, prior_precision=1.0, generator=noise)
    states = []

    def after_step() -> None:
        states.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))

    history = train(
        lambda xb, yb: (net(xb)[:, 0] - yb).pow(2).mean(), opt,
        tensor_batches((X, y), BATCH, torch.Generator().manual_seed(2)), 3,
        after_step=after_step,
    )  # fmt: skip
    return {"states": torch.stack(states), "history": history}


def task_sgmcmc_estimator() -> dict:
    X, y = _data(60)
    est = SGMCMCRegressor(hidden_sizes=(8,), epochs=6, batch_size=9, n_cycles=2, random_state=0)
    mean, std = est.fit(X.numpy(), y.numpy()).predict(X.numpy(), return_std=True)
    return {"mean": mean, "std": std, "lr": est.lr_, "n_chains": est.n_chains_}


def task_vbll_head() -> dict:
    X, y = _data()
    torch.manual_seed(0)
    head = VBLLRegression(3, 1).double().fit((X, y), epochs=4, batch_size=BATCH, seed=0)
    return {"params": _params(head), "history": head.history_}


def task_vbll_network() -> dict:
    X, y = _data()
    torch.manual_seed(0)
    net = VBLLNetwork(nn.Sequential(nn.Linear(3, 8), nn.Tanh()), VBLLRegression(8, 1)).double()
    net.fit((X, y), epochs=3, batch_size=BATCH, seed=0)
    return {"params": _params(net), "history": net.history_}


def task_vbll_wrap() -> dict:
    """A trained network made Bayesian in its last layer (post hoc, classification head)."""
    X, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = wrap(net, "classification").fit((X, (y > 0).long() + (y > 1).long()), epochs=3, seed=0)
    return {"params": _params(model), "history": model.history_}


def task_svgp() -> dict:
    X, y = _data()
    model = SVGP.from_data(X, y, 10).fit((X, y), epochs=3, batch_size=BATCH, seed=0)
    return {"params": _params(model), "history": model.history_}


def task_swsgp() -> dict:
    X, y = _data()
    torch.manual_seed(0)  # the initial variational factor
    kernel = ScaleKernel(RBFKernel(ard_num_dims=3)).double()
    Z = select_inducing_points(X, 10, seed=0)
    model = SWSGP(kernel, Z, num_neighbors=4, rank=2, neighbor_method="brute")
    model.fit((X, y), epochs=3, batch_size=BATCH, seed=0)
    return {"params": _params(model), "history": model.history_}


def task_ssvi() -> dict:
    X, y = _data()
    torch.manual_seed(0)
    arch = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    net = sparsify(arch, 0.5, task="regression", seed=0)
    net.fit((X, y), epochs=4, batch_size=BATCH, seed=0, update_every=2, alpha=0.3)
    return {"params": _params(net), "history": net.history_}


def task_allreduce_flags() -> dict:
    """Rank r has a gradient r + 1 on ``a``, one on ``b`` only on rank 0, none on ``c``."""
    rank = distributed.get_rank()
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    a.grad = torch.full((2,), rank + 1.0)
    if rank == 0:
        b.grad = torch.ones(2)
    distributed.allreduce_gradients([a, b, c])
    return {"a": a.grad, "b": b.grad, "c": c.grad}


TASKS = {
    "sgld_chain": task_sgld_chain,
    "sgmcmc_estimator": task_sgmcmc_estimator,
    "vbll_head": task_vbll_head,
    "vbll_network": task_vbll_network,
    "vbll_wrap": task_vbll_wrap,
    "svgp": task_svgp,
    "swsgp": task_swsgp,
    "ssvi": task_ssvi,
}


def run_tasks_data_parallel() -> dict:
    """The worker: every task under data_parallel, plus the bare all-reduce check."""
    with distributed.data_parallel():
        out = {name: task() for name, task in TASKS.items()}
    out["allreduce"] = task_allreduce_flags()
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return distributed.spawn(run_tasks_data_parallel, 2, timeout=120, join_timeout=300)


def _close(a, b, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], rtol, atol)
    elif isinstance(a, (list, tuple)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    else:
        assert a == pytest.approx(b, rel=rtol, abs=atol)


# -- two ranks against one process ----------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["sgld_chain", "vbll_head", "vbll_network", "vbll_wrap", "svgp", "swsgp"]
)
def test_two_ranks_equal_one_process_with_the_global_batch(two_ranks, name):
    """Sharded minibatches (uneven, one share empty) + averaged gradients = the global batch:
    every state of the SGLD chain (its noise drawn identically on both ranks), and the trained
    parameters and epoch losses of a VBLL head, a VBLL network, a wrapped network, SVGP and
    SWSGP."""
    reference = TASKS[name]()
    for result in two_ranks:
        _close(result[name], reference)


def test_data_parallel_sgmcmc_estimator_is_the_single_process_chain(two_ranks):
    reference = task_sgmcmc_estimator()
    assert reference["n_chains"] == 1
    for result in two_ranks:
        assert result["sgmcmc_estimator"]["n_chains"] == 1  # one chain, not one per rank
        _close(result["sgmcmc_estimator"], reference, rtol=1e-4, atol=1e-5)  # float32


def test_data_parallel_ssvi_keeps_the_ranks_identical(two_ranks):
    """SSVI's loss draws per-rank noise, so it is not the single-process run; but the
    parameters and the support (topology updates from the all-reduced growth gradient)
    stay identical on both ranks, and the losses are the global means."""
    first, second = (r["ssvi"] for r in two_ranks)
    _close(first, second, rtol=0, atol=0)
    assert np.isfinite(first["history"]).all()


def test_allreduce_gradients_averages_and_keeps_missing_gradients_missing(two_ranks):
    for result in two_ranks:
        grads = result["allreduce"]
        torch.testing.assert_close(grads["a"], torch.full((2,), 1.5))
        torch.testing.assert_close(grads["b"], torch.full((2,), 0.5))
        assert grads["c"] is None


# -- failures surface -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "message"), [("raise", "rank 1 failed on purpose"), ("exit", "rank 1: exit code 3")]
)
def test_a_crashed_worker_is_an_error_on_the_launcher_not_a_hang(kind, message):
    """Whichever rank's failure the launcher sees first (rank 0's collective fails when rank 1
    is gone), the error names every rank's exit code and carries rank 1's traceback."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message) as info:
        distributed.spawn(crash, 2, args=(kind,), timeout=60, join_timeout=120)
    assert isinstance(info.value.__cause__, ProcessException)
    assert time.monotonic() - start < 60  # well before the collective's timeout


def test_spawn_join_timeout_terminates_the_workers():
    with pytest.raises(TimeoutError, match="join_timeout"):
        distributed.spawn(sleep_forever, 2, join_timeout=1.0)


def test_spawn_rejects_what_children_cannot_find():
    with pytest.raises(ValueError, match="top level"):
        distributed.spawn(lambda: None, 2)
    with pytest.raises(ValueError, match="backend"):
        distributed.spawn(sleep_forever, 2, backend="mpi")
    with pytest.raises(ValueError, match="nprocs"):
        distributed.spawn(sleep_forever, 0)


# -- one process ----------------------------------------------------------------------------
@pytest.fixture
def world_of_one():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1
        )  # fmt: skip
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_data_parallel_with_one_rank_changes_nothing(world_of_one):
    plain = {name: TASKS[name]() for name in ("sgld_chain", "vbll_head", "svgp")}
    with distributed.data_parallel() as state:
        assert distributed.active() is state and state.world_size == 1
        parallel = {name: TASKS[name]() for name in plain}
    assert distributed.active() is None
    _close(parallel, plain, rtol=0, atol=0)


def test_outside_a_process_group_everything_is_a_no_op():
    assert not distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    distributed.allreduce_gradients([p])
    distributed.broadcast_parameters([p])
    torch.testing.assert_close(p.grad, torch.ones(2))
    assert distributed.agreed_seed(7) == 7 and distributed.broadcast_int(3) == 3
    t = [torch.ones(3)]
    assert distributed.average_batch_tensors(t)[0] is t[0]
    assert distributed.all_gather_rows(t[0])[0] is t[0]
    with pytest.raises(RuntimeError, match="init_process_group"):
        with distributed.data_parallel():
            pass


# -- sharding -------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "world"), [(10, 3), (1, 2), (7, 7), (0, 2), (16, 4)])
def test_shard_bounds_partition_in_rank_order(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_takes_views_along_dim_and_checks_its_arguments():
    X, y = torch.arange(20.0).reshape(10, 2), torch.arange(10.0)
    xs, ys = distributed.shard((X, y), 1, 3)
    torch.testing.assert_close(ys, torch.arange(4.0, 7.0))
    torch.testing.assert_close(xs, X[4:7])
    (cols,) = distributed.shard((X.T,), 0, 3, dim=1)
    torch.testing.assert_close(cols, X.T[:, :4])
    with pytest.raises(ValueError, match="rank"):
        distributed.shard((X,), 3, 3)
    with pytest.raises(ValueError, match="differ in length"):
        distributed.shard((X, y[:5]), 0, 2)
    with pytest.raises(ValueError, match="sequence"):
        distributed.shard(X, 0, 2)


def test_the_data_parallel_state_shards_by_dims_and_weighs_by_share():
    state = distributed.DataParallel.__new__(distributed.DataParallel)
    state.group, state.rank, state.world_size, state.shard_batches = None, 1, 2, True
    X, y = torch.randn(2, 5, 3), torch.randn(2, 5)  # a batch of 2 GPs, data dims (-2, -1)
    xs, ys = state.shard((X, y), (-2, -1))
    torch.testing.assert_close(xs, X[:, 3:])
    torch.testing.assert_close(ys, y[:, 3:])
    assert state.local_size == 2 and state.weight == pytest.approx(2 * 2 / 5)
    (one,) = state.shard((torch.randn(1, 3),), 0)  # rank 1's share of one point is empty
    assert state.local_size == 0 and state.weight == 0.0 and one.shape == (1, 3)
    batch = (torch.randn(4, 3),)
    assert state.shard(batch, None) is batch and state.weight == 1.0  # not shardable
    assert state.local_size is None


def test_tensor_batches_are_shardable_and_shardable_marks_any_source():
    source = tensor_batches((torch.randn(6, 2), torch.randn(6)), 4, None, dims=(0, 0))
    assert source.dims == [0, 0]

    def epoch():
        return iter([(torch.randn(3, 2),)])

    assert shardable(epoch, 0) is epoch and epoch.dims == 0
    marked = shardable(lambda: iter([]), (-2, -1))
    assert marked.dims == (-2, -1)

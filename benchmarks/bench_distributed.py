"""Scaling out on one machine: SG-MCMC chains per second and data-parallel step time.

Workloads (friedman1, 10 inputs, ``N = 4000``, targets standardised by the estimators):

- **chains**: ``SGMCMCRegressor(hidden_sizes=(64, 64), epochs=8, batch_size=64)``, one chain
  per fit. One process runs ``P`` chains one after another (seeds 0..P-1), with one thread and
  with ``P`` threads; ``P`` processes (``bdl.core.distributed.spawn``, gloo on loopback, one
  thread each) run one fit inside the process group, i.e. one chain per rank, gathered on every
  rank with the cross-chain diagnostics (timed separately as well). Chains per second =
  chains / wall time of the fits (from a barrier to a barrier; the process start-up, seconds
  of imports, is only in the end-to-end time printed below the table).
- **data-parallel step** (``N = 16384``): one optimisation step (forward, backward,
  all-reduce, Adam) of a VBLL network (2x128 ReLU body, regression head, 18k parameters;
  ``vbll-wide``: 2x512, 270k parameters) and of an SVGP (256 inducing points), global
  minibatch ``B``; one process (1 or ``P`` threads) against ``P`` processes under
  ``data_parallel()`` (each computes ``B / P`` points). Time per step = time of ``fit``
  with ``epochs`` passes / steps (the model built and warmed up before), median of
  ``--repeats``.

Each cell gives the wall time and, in brackets where shown, the CPU time of the busiest
process (``time.process_time``; gloo waits without spinning). On a machine shared with other
jobs the multi-process rows lose most wall time: each step waits for the rank the scheduler
left behind. The CPU time does not include that wait; on an idle machine the wall time of
the one-thread rows approaches it. The load average is printed before and after.

Usage: ``python benchmarks/bench_distributed.py [--quick] [--procs 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_distributed.py`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.datasets import make_friedman1  # noqa: E402
from torch import nn  # noqa: E402

from bdl.core import distributed  # noqa: E402
from bdl.lastlayer import VBLLNetwork, VBLLRegression  # noqa: E402
from bdl.sgmcmc import SGMCMCRegressor, chain_diagnostics  # noqa: E402
from bdl.sgmcmc.estimators import DIAGNOSTIC_POINTS  # noqa: E402
from gp.sparse import SVGP  # noqa: E402

N = 4000  # chains
N_STEP = 16_384  # data-parallel steps
WIDTHS = {"vbll": 128, "vbll-wide": 512}
#: (model, global batch sizes) of the data-parallel rows
STEP_ROWS = (("vbll", (256, 1024)), ("vbll-wide", (1024, 4096)), ("svgp", (1024, 4096)))


def data(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_friedman1(n_samples=n, noise=1.0, random_state=0)
    return X.astype(np.float32), ((y - y.mean()) / y.std()).astype(np.float32)


def fit_chain(seed: int, epochs: int) -> SGMCMCRegressor:
    X, y = data()
    est = SGMCMCRegressor(hidden_sizes=(64, 64), epochs=epochs, batch_size=64, random_state=seed)
    return est.fit(X, y)


def make_model(kind: str) -> Callable[[int, int], object]:
    """The model of a data-parallel row, built once; returns ``fit(batch, epochs)``."""
    X, y = (torch.as_tensor(a) for a in data(N_STEP))
    torch.manual_seed(0)
    if kind.startswith("vbll"):
        width = WIDTHS[kind]
        body = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        model = VBLLNetwork(body, VBLLRegression(width, 1))
    else:
        model = SVGP.from_data(X, y, 256, seed=0)
    return lambda batch, epochs: model.fit((X, y), epochs=epochs, batch_size=batch, seed=0)


def _timed(fn, *args) -> tuple[float, float]:
    """Wall seconds (barrier to barrier in a group) and this process's CPU seconds of fn."""
    if dist.is_initialized():
        dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn(*args)
    cpu = time.process_time() - start_cpu
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start, cpu


def chains_worker(epochs: int, repeats: int) -> dict:
    """Inside the group: one fit = one chain per rank, gathered."""
    fit_chain(0, 1)  # warm-up (lazy imports, allocator)
    times, est = [], None

    def run() -> None:
        nonlocal est
        est = fit_chain(0, epochs)

    for _ in range(repeats):
        times.append(_timed(run))
    # the part of a fit only the multi-chain run does: the diagnostics (the gather is cheap)
    X, _ = data()
    x = est.input_transform_(torch.as_tensor(X[:DIAGNOSTIC_POINTS], dtype=torch.float64))
    diagnostics = [
        _timed(chain_diagnostics, est.model_.model, x.float())[0] for _ in range(repeats)
    ]
    return {
        "times": times, "n_chains": est.n_chains_, "diagnostics": est.chain_diagnostics_,
        "diagnostics_s": statistics.median(diagnostics),
    }  # fmt: skip


def step_worker(kind: str, batch: int, epochs: int, repeats: int) -> list[tuple[float, float]]:
    fit = make_model(kind)
    with distributed.data_parallel():
        fit(batch, 1)  # warm-up
        return [_timed(fit, batch, epochs) for _ in range(repeats)]


def _medians(per_rank: list[list[tuple[float, float]]]) -> tuple[float, float]:
    """Median over repeats of the wall time (equal on all ranks) and of the largest CPU time
    of any rank."""
    walls = [max(rank[i][0] for rank in per_rank) for i in range(len(per_rank[0]))]
    cpus = [max(rank[i][1] for rank in per_rank) for i in range(len(per_rank[0]))]
    return statistics.median(walls), statistics.median(cpus)


def allreduce_worker(numel: int, repeats: int) -> float:
    """Median seconds of one ``allreduce_gradients`` of ``numel`` float32 gradients."""
    p = torch.zeros(numel, requires_grad=True)
    p.grad = torch.ones(numel)

    def fifty() -> None:
        for _ in range(50):
            distributed.allreduce_gradients([p])

    return statistics.median(_timed(fifty)[0] for _ in range(repeats)) / 50


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("chains", "steps"), help="run one part")
    args = parser.parse_args()
    procs, repeats = args.procs, (1 if args.quick else args.repeats)
    chain_epochs, step_epochs = (1, 1) if args.quick else (8, 2)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {procs} processes; {load()}")

    if args.only != "steps":
        run_chains(procs, repeats, chain_epochs)
    if args.only != "chains":
        run_steps(procs, repeats, step_epochs)
    print(load())


def run_chains(procs: int, repeats: int, chain_epochs: int) -> None:
    rows = []
    for threads in sorted({1, procs}):
        torch.set_num_threads(threads)
        fit_chain(0, 1)
        times = [
            _timed(lambda: [fit_chain(s, chain_epochs) for s in range(procs)])
            for _ in range(repeats)
        ]
        rows.append((f"1 process x {threads} thread(s), {procs} chains in turn", [times]))
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = distributed.spawn(chains_worker, procs, args=(chain_epochs, repeats), timeout=600)
    total = time.perf_counter() - start
    rows.append((f"{procs} processes x 1 thread, one chain each", [r["times"] for r in result]))
    print(f"\nchains: SGMCMCRegressor (64, 64), friedman1 N={N}, {chain_epochs} epochs per chain")
    print("| run | wall s per round | chains / s | speed-up | CPU s (busiest process) |")
    print("|---|---|---|---|---|")
    base = procs / _medians(rows[0][1])[0]
    for label, times in rows:
        wall, cpu = _medians(times)
        rate = procs / wall
        print(f"| {label} | {wall:.2f} | {rate:.3f} | {rate / base:.2f} | {cpu:.2f} |")
    print(
        f"({procs} processes: of each round {result[0]['diagnostics_s']:.2f} s go to "
        "chain_diagnostics; "
        f"end to end incl. start-up, warm-up and {repeats} rounds: "
        f"{total:.1f} s; n_chains_ = {result[0]['n_chains']}; diagnostics: "
        + ", ".join(f"{k} {v:.3g}" for k, v in result[0]["diagnostics"].items())
        + ")"
    )


def run_steps(procs: int, repeats: int, step_epochs: int) -> None:
    print(f"\ndata-parallel step, ms per step: wall (CPU of the busiest process) ({load()})")
    print(
        f"| model | global batch | 1 proc x 1 thread | 1 proc x {procs} threads | "
        f"{procs} procs x 1 thread | wall speed-up | CPU speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, batches in STEP_ROWS:
        for batch in batches:
            steps = step_epochs * -(-N_STEP // batch)
            cells = []
            for threads in (1, procs):
                torch.set_num_threads(threads)
                fit = make_model(kind)
                fit(batch, 1)  # warm-up
                times = [_timed(fit, batch, step_epochs) for _ in range(repeats)]
                cells.append(_medians([times]))
            torch.set_num_threads(1)
            cells.append(
                _medians(
                    distributed.spawn(step_worker, procs, args=(kind, batch, step_epochs, repeats))
                )
            )
            ms = [(1e3 * w / steps, 1e3 * c / steps) for w, c in cells]
            text = " | ".join(f"{w:.2f} ({c:.2f})" for w, c in ms)
            print(
                f"| {kind} | {batch} | {text} | {ms[0][0] / ms[2][0]:.2f} | "
                f"{ms[0][1] / ms[2][1]:.2f} |"
            )
    print()
    for numel in (18_000, 270_000):
        seconds = distributed.spawn(allreduce_worker, procs, args=(numel, max(repeats, 3)))[0]
        print(f"allreduce_gradients of {numel} float32 gradients: {1e6 * seconds:.0f} µs")


if __name__ == "__main__":
    main()

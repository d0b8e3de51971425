"""Cost of one state-space GP log marginal likelihood + gradient: sequential vs parallel scan.

One evaluation = ``StateSpaceGP.log_marginal_likelihood(t, y)`` + ``backward()`` (gradients
w.r.t. the lengthscale, outputscale and noise) for a ``ScaleKernel(MaternKernel(nu=1.5))``
(state dimension 2), float64, on ``n`` sorted irregular times (uniform on [0, n / 10], one in
20 targets missing), one thread on CPU, for ``method="sequential"`` (Python loop,
:mod:`gp.statespace.kalman`) and ``method="parallel"`` (associative scan,
:mod:`gp.statespace.parallel`). After one warm-up, each case is repeated until at least
``--min-time`` seconds (and ``--min-reps`` repetitions) have passed; the table gives the median
time per evaluation divided by ``n`` (µs per time step). No targets: for the record.

Usage: ``python benchmarks/bench_statespace.py [--sizes 1000 10000 100000] [--min-time 1]
[--min-reps 3]`` (the recorded run used ``--min-reps 1``: sequential at n = 1e5 takes ~30 s).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

from gp.statespace import StateSpaceGP

METHODS = ("sequential", "parallel")


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * n / 10).values
    y = torch.sin(t) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    y[::20] = float("nan")
    return t, y


def time_lml_grad(method: str, n: int, min_time: float, min_reps: int) -> float:
    """Median seconds of one LML + backward evaluation."""
    model = StateSpaceGP(ScaleKernel(MaternKernel(nu=1.5)), noise=0.1, method=method)
    model = model.to(torch.float64)
    t, y = _data(n)

    def once() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.log_marginal_likelihood(t, y).backward()
        return time.perf_counter() - start

    once()  # warm-up
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_time:
        times.append(once())
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--min-reps", type=int, default=3)
    args = parser.parse_args()
    header_line = C.one_thread()
    print(header_line)
    rows = []
    for method in METHODS:
        cells = [method]
        for n in args.sizes:
            seconds = time_lml_grad(method, n, args.min_time, args.min_reps)
            cells.append(f"{1e6 * seconds / n:.2f}")
            per_step = 1e6 * seconds / n
            print(f"{method:>10s}  n = {n:>7d}: {1e3 * seconds:9.1f} ms, {per_step:.2f} µs/step")
        rows.append(cells)
    table = C.markdown_table(["method \\ n"] + [f"{n:,}" for n in args.sizes], rows)
    text = (
        "# State-space GP: LML + gradient, µs per time step (CPU, float64, Matérn-3/2)\n\n"
        f"{header_line}\n\n{table}\n"
    )
    print(text)
    print(f"written to {C.write_out('statespace_lml.md', text)}")


if __name__ == "__main__":
    main()

"""Cost of one state-space GP log marginal likelihood (+ gradient): sequential, scan, compiled.

One evaluation = the exact LML of a ``ScaleKernel(MaternKernel(nu=1.5))`` (state dimension 2)
+ Gaussian noise, float64, on ``n`` sorted irregular times (uniform on [0, n / 10], one in 20
targets missing), one thread on CPU, by

- ``sequential``: ``StateSpaceGP(method="sequential")`` (Python Kalman loop, :mod:`.kalman`);
- ``parallel``: ``StateSpaceGP(method="parallel")`` (eager torch associative scan);
- ``fast``: ``StateSpaceGP(method="fast")`` (what ``"auto"`` picks on CPU with numba):
  :func:`gp.statespace.fast.fast_log_marginal_likelihood`, a numba-compiled filter with exact
  in-loop discretisation and a hand-written adjoint.

"LML + grad" includes ``backward()`` to the lengthscale, outputscale and noise; "forward" is
the LML under ``torch.no_grad()``. Each (method, n) runs in its own subprocess, which reports
the median wall and CPU (process) time per evaluation (one warm-up, then repetitions until
``--min-time`` seconds and ``--min-reps`` repetitions) and its peak resident set size
(``os.wait4`` rusage of that child, ``ru_maxrss``), next to the RSS right after imports and
data creation (baseline). The numba compile time is the first LML + grad call in a fresh
subprocess with an empty numba cache (``NUMBA_CACHE_DIR`` set to a new temporary directory),
and the cached start-up the first call of a second process sharing that cache.

Usage: ``python benchmarks/bench_statespace.py [--sizes 1000 10000 100000 1000000]
[--methods fast parallel sequential] [--min-time 1] [--min-reps 3]
[--max-n-sequential 10000] [--max-n-parallel 1000000]``. No targets asserted; the issue's
target is <= 1 µs/step for LML + grad at n = 1e6.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel

from gp.statespace import StateSpaceGP
from gp.statespace.fast import numba_available

METHODS = ("fast", "parallel", "sequential")
SCRIPT = Path(__file__).resolve()


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * n / 10).values
    y = torch.sin(t) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    y[::20] = float("nan")
    return t, y


def _model(method: str) -> StateSpaceGP:
    kernel = ScaleKernel(MaternKernel(nu=1.5))
    kernel.base_kernel.lengthscale = 0.5
    kernel.outputscale = 1.3
    return StateSpaceGP(kernel, noise=0.05, method=method).to(torch.float64)


def _lml(model: StateSpaceGP, method: str, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.log_marginal_likelihood(t, y, method=method)


def _median_seconds(fn, min_time: float, min_reps: int) -> tuple[float, float]:  # noqa: ANN001
    """Median wall and CPU (process) seconds of ``fn()`` after one warm-up call."""
    fn()  # warm-up (for "fast": loads the compiled code from the numba cache)
    wall: list[float] = []
    cpu: list[float] = []
    while len(wall) < min_reps or sum(wall) < min_time:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def worker(method: str, n: int, min_time: float, min_reps: int) -> dict[str, float]:
    """Run in a subprocess: times of LML + grad and of the forward pass, baseline RSS."""
    import resource

    C.one_thread()
    model = _model(method)
    t, y = _data(n)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def with_grad() -> None:
        model.zero_grad(set_to_none=True)
        _lml(model, method, t, y).backward()

    def forward() -> None:
        with torch.no_grad():
            _lml(model, method, t, y)

    grad_s, grad_cpu_s = _median_seconds(with_grad, min_time, min_reps)
    fwd_s, fwd_cpu_s = _median_seconds(forward, min_time, min_reps)
    return {
        "grad_s": grad_s,
        "grad_cpu_s": grad_cpu_s,
        "fwd_s": fwd_s,
        "fwd_cpu_s": fwd_cpu_s,
        "baseline_mb": baseline_kb / 1024,
    }


def compile_worker() -> dict[str, float]:
    """Run in a subprocess: wall and CPU seconds of the first and second LML + grad calls."""
    C.one_thread()
    model = _model("fast")
    t, y = _data(1000)
    out: dict[str, float] = {}
    for label in ("first", "second"):
        wall, cpu = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        _lml(model, "fast", t, y).backward()
        out[f"{label}_wall_s"] = time.perf_counter() - wall
        out[f"{label}_cpu_s"] = time.process_time() - cpu
    return out


def _spawn(args: list[str], env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run this script with ``args``; returns its JSON result and its peak RSS in MiB."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, text=True, env=env
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed with exit code {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def measure_compile() -> dict[str, float]:
    """First call with an empty numba cache, then a cached start in a second process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold, _ = _spawn(["--compile-worker"], env)
        warm, _ = _spawn(["--compile-worker"], env)
    return {
        "cold_wall_s": cold["first_wall_s"],
        "cold_cpu_s": cold["first_cpu_s"],
        "cached_wall_s": warm["first_wall_s"],
        "steady_wall_s": warm["second_wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-n-sequential", type=int, default=10000)
    parser.add_argument("--max-n-parallel", type=int, default=1000000)
    parser.add_argument("--no-compile", action="store_true", help="skip the compile timing")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(method, n, args.min_time, args.min_reps)))
        return
    if args.compile_worker:
        print(json.dumps(compile_worker()))
        return

    header_line = C.one_thread()
    methods = [m for m in args.methods if m != "fast" or numba_available()]
    limits = {"sequential": args.max_n_sequential, "parallel": args.max_n_parallel}
    print(header_line)
    results: dict[tuple[str, int], tuple[dict, float]] = {}
    for i, n in enumerate(args.sizes):
        order = methods if i % 2 == 0 else methods[::-1]  # alternate who goes first
        for method in order:
            if n > limits.get(method, n):
                continue
            flags = ["--min-time", str(args.min_time), "--min-reps", str(args.min_reps)]
            res, rss = _spawn(["--worker", method, str(n), *flags])
            results[method, n] = (res, rss)
            print(
                f"{method:>10s}  n = {n:>8d}: LML+grad {1e6 * res['grad_s'] / n:8.3f} µs/step "
                f"(CPU {1e6 * res['grad_cpu_s'] / n:.3f}), forward {1e6 * res['fwd_s'] / n:8.3f} "
                f"µs/step (CPU {1e6 * res['fwd_cpu_s'] / n:.3f}), peak RSS {rss:7.1f} MiB "
                f"(baseline {res['baseline_mb']:.1f})",
                flush=True,
            )

    def cell(method: str, n: int, key: str) -> str:
        if (method, n) not in results:
            return "-"
        res, rss = results[method, n]
        if key == "rss":
            return f"{rss:.0f} (+{rss - res['baseline_mb']:.0f})"
        return f"{1e6 * res[key] / n:.3f}"

    header = ["method \\ n"] + [f"{n:,}" for n in args.sizes]
    sections = []
    for key, title in (
        ("grad_s", "LML + gradient, µs per time step"),
        ("grad_cpu_s", "LML + gradient, CPU (process) µs per time step"),
        ("fwd_s", "forward only (no_grad), µs per time step"),
        ("fwd_cpu_s", "forward only (no_grad), CPU (process) µs per time step"),
        ("rss", "peak RSS of the subprocess, MiB (+ above its post-import baseline)"),
    ):
        rows = [[m] + [cell(m, n, key) for n in args.sizes] for m in methods]
        sections.append(f"### {title}\n\n{C.markdown_table(header, rows)}\n")
    if "fast" in methods:
        ratios = [
            f"{results['parallel', n][0]['grad_s'] / results['fast', n][0]['grad_s']:.1f}x "
            f"at n = {n:,}"
            for n in args.sizes
            if ("parallel", n) in results and ("fast", n) in results
        ]
        if ratios:
            sections.append("fast vs parallel scan (LML + grad, same run): " + ", ".join(ratios))
    if "fast" in methods and not args.no_compile:
        comp = measure_compile()
        sections.append(
            "numba compile (first LML + grad at n = 1,000 in a fresh process, empty cache): "
            f"{comp['cold_wall_s']:.1f} s wall, {comp['cold_cpu_s']:.1f} s CPU; with the cache "
            f"filled, a new process's first call: {comp['cached_wall_s']:.2f} s; "
            f"steady state: {1e3 * comp['steady_wall_s']:.2f} ms"
        )
    text = (
        "# State-space GP log marginal likelihood (CPU, float64, Matérn-3/2, 1 thread)\n\n"
        f"{header_line}\n\n" + "\n".join(sections) + "\n"
    )
    print(text)
    print(f"written to {C.write_out('statespace_lml.md', text)}")


if __name__ == "__main__":
    main()

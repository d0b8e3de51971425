"""Time and memory of ``K(X, Z) @ V`` at n = 1e6: kernel_matvec vs a lean tiled torch reference.

Setup (issue 4, item 1): ``ScaleKernel(RBFKernel(ard_num_dims=8))`` (ARD lengthscales
``linspace(1, 2, 8)``, outputscale 1.3), ``d = 8``, ``n = 10^6`` rows of ``X`` and ``m = 1000``
rows of ``Z``, both standard normal, ``V`` of shape ``(m, 1)`` and ``(m, k)``; float32, no
gradients, ``torch.set_num_threads(2)``. Methods:

- ``reference``: plain tiled torch. Per tile of rows: ``D = addmm(-|z|^2/2, x, z^T)`` (one GEMM
  on the lengthscale-scaled inputs), ``D -= |x|^2/2``, ``D.exp_()``, ``mm(D, outputscale V)``
  into a preallocated output.
- ``ours``: ``gp.kernels.kernel_matvec(kernel, X, Z, V)`` on the gpytorch kernel (default
  ``backend="auto"``: the one-GEMM path of ``gp.kernels._fastpath``).
- ``gpytorch``: ``kernel_matvec(..., backend="gpytorch")``, each tile through the gpytorch
  kernel's own ``forward`` (for comparison).

All methods use the same tile (rows per tile, ``--tile-mib`` of kernel entries; default
``gp.kernels.default_tile_size`` for float32). Timing: in this process, one warm-up call each,
then ``--reps`` rounds in which the methods run one after the other, the order rotating from
round to round; medians and the ratio to ``reference`` come from the same run. Memory: each
(method, k) runs in fresh subprocesses; a subprocess's peak RSS is
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a bare ``python -S`` driver that
started only that child (started from this process instead, a child's ``ru_maxrss`` would
include this process's own peak, which it inherits at exec).
One subprocess builds X, Z, V and the kernel and runs the method on one tile of rows (which
maps the BLAS and vector-math code, about 100 MiB of RSS that is not data); a second does the
same and then one call on all n rows. The table gives the difference of their peaks.

Usage: ``python benchmarks/bench_kernel_matvec.py [--n 1000000] [--k 1 8] [--reps 5]``;
``--sweep 2 4 8 16 32 64`` times ``ours`` and ``reference`` (k = 1) at those tile sizes (MiB).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gpytorch
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gp.kernels import default_tile_size, kernel_matvec  # noqa: E402

DT = torch.float32
D, OUTPUTSCALE = 8, 1.3
METHODS = ("reference", "ours", "gpytorch")


def make_problem(
    n: int, m: int, k: int
) -> tuple[ScaleKernel, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, D, generator=g, dtype=DT)
    Z = torch.randn(m, D, generator=g, dtype=DT)
    V = torch.randn(m, k, generator=g, dtype=DT)
    kernel = ScaleKernel(RBFKernel(ard_num_dims=D)).to(DT)
    with torch.no_grad():
        kernel.base_kernel.lengthscale = torch.linspace(1.0, 2.0, D, dtype=DT)
        kernel.outputscale = torch.tensor(OUTPUTSCALE, dtype=DT)
    return kernel, X, Z, V


def reference_matvec(
    kernel: ScaleKernel, X: torch.Tensor, Z: torch.Tensor, V: torch.Tensor, tile: int
):
    """Lean tiled ``K(X, Z) @ V`` for an ARD RBF in a ScaleKernel (plain torch)."""
    inv_ls = kernel.base_kernel.lengthscale.reciprocal()  # (1, d)
    Zs = Z * inv_ls
    half_zz = Zs.square().sum(-1).mul_(-0.5)  # (m,)
    Zs_t = Zs.T.contiguous()
    Vs = V * kernel.outputscale
    out = torch.empty(X.shape[0], V.shape[1], dtype=X.dtype)
    for start in range(0, X.shape[0], tile):
        Xs = X[start : start + tile] * inv_ls
        block = torch.addmm(half_zz, Xs, Zs_t)  # x.z - |z|^2 / 2
        block.sub_(Xs.square().sum(-1, keepdim=True).mul_(0.5)).exp_()  # exp(-|x - z|^2 / 2)
        torch.mm(block, Vs, out=out[start : start + tile])
    return out


def runner(method: str, kernel: ScaleKernel, X, Z, V, tile: int) -> Callable[[], torch.Tensor]:
    if method == "reference":
        return lambda: reference_matvec(kernel, X, Z, V, tile)
    if method == "ours":
        return lambda: kernel_matvec(kernel, X, Z, V, tile_size=tile)
    if method == "gpytorch":
        return lambda: kernel_matvec(kernel, X, Z, V, tile_size=tile, backend="gpytorch")
    raise ValueError(f"unknown method {method!r}")


def tile_rows(tile_mib: float | None, m: int) -> int:
    if tile_mib is None:
        return default_tile_size(m, 1, DT)
    return max(1, int(tile_mib * 2**20) // (m * DT.itemsize))


def child(method: str, n: int, m: int, k: int, tile: int, threads: int, full: bool) -> None:
    """Body of one memory subprocess: build the problem, run ``method`` on the first ``tile``
    rows (this maps the BLAS / vector-math code into memory, about 100 MiB of RSS), then, if
    ``full``, on all ``n`` rows."""
    torch.set_num_threads(threads)
    kernel, X, Z, V = make_problem(n, m, k)
    with torch.no_grad():
        runner(method, kernel, X[:tile], Z, V, tile)()
        if full:
            runner(method, kernel, X, Z, V, tile)()


# Run by a bare ``python -S`` driver: a child started (vfork + exec) straight from this process
# would inherit this process's own peak RSS into its ru_maxrss.
_DRIVER = """
import os, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(args: argparse.Namespace, method: str, k: int, tile: int, full: bool) -> float:
    cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n), "--m", str(args.m)]
    cmd += ["--k", str(k), "--tile-rows", str(tile), "--threads", str(args.threads)]
    cmd += ["--full"] if full else []
    driver = [sys.executable, "-S", "-c", _DRIVER, *cmd]
    out = subprocess.run(driver, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024  # KiB on Linux


def time_methods(methods, kernel, X, Z, V, tile: int, reps: int) -> dict[str, list[float]]:
    runs = {name: runner(name, kernel, X, Z, V, tile) for name in methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
        for r in range(reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tile-mib", type=float, default=None)
    parser.add_argument("--sweep", type=float, nargs="+", default=None, metavar="MIB")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tile-rows", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.n, args.m, args.k[0], args.tile_rows, args.threads, args.full)
        return
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, gpytorch {gpytorch.__version__}, "
        f"torch.set_num_threads({args.threads}) (get_num_threads() = {torch.get_num_threads()}), "
        f"float32, ScaleKernel(RBFKernel(ard_num_dims={D})), n = {args.n}, m = {args.m}, d = {D}"
    )
    if args.sweep:
        kernel, X, Z, V = make_problem(args.n, args.m, 1)
        print("| tile MiB | rows | ours s | reference s | ours/reference |")
        print("|---|---|---|---|---|")
        for mib in args.sweep:
            tile = tile_rows(mib, args.m)
            t = time_methods(("ours", "reference"), kernel, X, Z, V, tile, args.reps)
            ours, ref = statistics.median(t["ours"]), statistics.median(t["reference"])
            print(f"| {mib:g} | {tile} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f} |", flush=True)
        return
    tile = tile_rows(args.tile_mib, args.m)
    print(f"tile: {tile} rows ({tile * args.m * DT.itemsize / 2**20:.1f} MiB of kernel entries)")
    print(f"timing: medians of {args.reps} rounds after one warm-up, methods alternated")
    header = "| k | method | median s | min s | / reference | extra peak RSS MiB |"
    print(header + "\n|---|---|---|---|---|---|")
    for k in args.k:
        kernel, X, Z, V = make_problem(args.n, args.m, k)
        with torch.no_grad():
            outs = {name: runner(name, kernel, X, Z, V, tile)() for name in args.methods}
        times = time_methods(args.methods, kernel, X, Z, V, tile, args.reps)
        ref = statistics.median(times["reference"]) if "reference" in times else None
        for name in args.methods:
            med = statistics.median(times[name])
            ratio = f"{med / ref:.2f}" if ref else "-"
            extra = "-"
            if not args.no_memory:
                hold = peak_rss_mib(args, name, k, tile, full=False)
                extra = f"{peak_rss_mib(args, name, k, tile, full=True) - hold:.0f}"
                print(f"  (peak RSS of {name}'s subprocess without the full call: {hold:.0f} MiB)")
            print(f"| {k} | {name} | {med:.3f} | {min(times[name]):.3f} | {ratio} | {extra} |")
        base = outs[args.methods[0]]
        for name, out in outs.items():
            err = float((out - base).abs().max() / base.abs().max())
            print(
                f"  k={k}: max |{name} - {args.methods[0]}| / max |{args.methods[0]}| = {err:.1e}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()

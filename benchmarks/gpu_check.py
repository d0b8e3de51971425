"""GPU checks, ready to run: every model's contract checks on CUDA tensors, and CPU-vs-GPU times.

Part 1, contract on the device. Every ``ModelCase`` and ``EstimatorCase`` of the contract suite
(``tests/core/cases*.py``) is built as the suite builds it (float64, seed 0, on the CPU), then
moved to the device (``.to(device)``; sample collectors through ``_apply``), and checked there:

- ``posterior``: mean and variance for ``(n, d)`` and ``(b, q, d)`` inputs on the device have
  the contract's shapes, live on the device, are finite with variance >= 0; their largest
  difference from the CPU model's posterior is reported (``max |d|``; a sampling-based
  posterior may differ by its Monte Carlo error: that is a note, not a failure);
- ``joint``: the joint covariance's diagonal equals the marginal variances (joint cases);
- ``noise``: ``observation_noise=True`` adds the case's noise variance (noise cases);
- ``grad``: the posterior is differentiable in ``X`` on the device (finite gradient);
- ``state_dict``: a fresh model on the device loaded from the state dict answers the same;
- ``fit``: the case's ``fit`` (its own CPU data) trains the model on the device;
- estimators: ``fit`` with ``device=<device>`` (where the estimator has that parameter) and
  ``posterior`` / ``predict`` finite.

Part 2, timings (median of ``--reps`` after a warm-up, ``torch.cuda.synchronize`` around each
GPU call; CPU with torch's default threads): ``gp.kernel_matvec`` (tiled torch, and KeOps when
``pykeops`` is installed), the parallel-scan state-space filter (LML + gradient), one SVGP and
one SWSGP training step, one VBLL network training step; one table, CPU against the device.

Without CUDA the script prints a message and exits with status 0. ``--device cpu`` is a dry run
of the same code on the CPU (both columns on the CPU; ``--quick`` shrinks every size), so the
GPU path is exercised everywhere. Exit status 1 if a contract check failed.

Usage: ``python benchmarks/gpu_check.py [--device cuda] [--quick] [-k CASE_SUBSTRING]
[-t TIMING_SUBSTRING] [--skip-contract] [--skip-timings] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests" / "core"):  # the package, and the contract suite's cases
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from gpytorch.kernels import MaternKernel, RBFKernel, ScaleKernel  # noqa: E402
from torch import nn  # noqa: E402

DT = torch.float64
Check = Callable[[], str | None]


# -- part 1: the contract on the device -----------------------------------------------------
def _inputs(shape: tuple[int, ...], device: torch.device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=gen, dtype=DT) * 4 - 2).to(device)


def to_device(model: Any, device: torch.device) -> Any:
    """``model`` moved to ``device``: ``.to`` for modules, ``_apply`` for sample collectors."""
    if isinstance(model, nn.Module):
        return model.to(device)
    if callable(getattr(model, "_apply", None)):
        model._apply(lambda t: t.to(device))
        return model
    return model.to(device)


def _on(t: torch.Tensor, device: torch.device) -> None:
    if t.device.type != device.type:
        raise AssertionError(f"result on {t.device}, expected {device}")


def _finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AssertionError(f"{name} not finite")


def model_checks(case: Any, device: torch.device) -> dict[str, Check]:
    """The device checks of one ``ModelCase`` (built lazily, once)."""
    built: dict[str, Any] = {}

    def model() -> Any:
        if "dev" not in built:
            torch.manual_seed(0)
            built["cpu"] = case.build(DT)
            built["dev"] = to_device(copy.deepcopy(built["cpu"]), device)
        return built["dev"]

    def posterior() -> str:
        worst = 0.0
        for shape in ((5,), (2, 4)):
            X = _inputs(shape + (case.d,), device)
            post = model().posterior(X)
            _on(post.mean, device)
            _finite(post.mean, "mean")
            _finite(post.variance, "variance")
            if bool((post.variance < 0).any()):
                raise AssertionError("negative variance")
            if post.mean.shape[-1] != model().num_outputs:
                raise AssertionError(f"mean shape {tuple(post.mean.shape)}")
            ref = built["cpu"].posterior(X.cpu())
            for a, b in ((post.mean, ref.mean), (post.variance, ref.variance)):
                worst = max(worst, float((a.detach().cpu() - b.detach()).abs().max()))
        return f"max |d| {worst:.1e}"

    def joint() -> None:
        X = _inputs((6, case.d), device)
        marginal, full = model().posterior(X), model().posterior(X, joint=True)
        cov = full.covariance_matrix
        _on(cov, device)
        diag = cov.diagonal(dim1=-2, dim2=-1).reshape(marginal.variance.shape)
        torch.testing.assert_close(diag, marginal.variance, rtol=1e-6, atol=1e-10)

    def noise() -> None:
        X = _inputs((6, case.d), device)
        latent, noisy = model().posterior(X), model().posterior(X, observation_noise=True)
        value = case.noise(model(), X) if case.noise_takes_inputs else case.noise(model())
        value = torch.as_tensor(value, dtype=DT).to(device).expand_as(latent.variance)
        torch.testing.assert_close(noisy.variance - latent.variance, value, rtol=1e-6, atol=1e-9)

    def grad() -> None:
        X = _inputs((3, case.d), device).requires_grad_(True)
        post = model().posterior(X)
        (post.mean.sum() + post.variance.sum()).backward()
        _on(X.grad, device)
        _finite(X.grad, "gradient")

    def state_dict() -> None:
        fresh = to_device(case.fresh(DT), device)
        fresh.load_state_dict(model().state_dict())
        X = _inputs((5, case.d), device)
        a, b = model().posterior(X), fresh.posterior(X)
        torch.testing.assert_close(b.mean, a.mean, rtol=1e-8, atol=1e-10)

    def fit() -> None:
        fresh = to_device(case.fresh(DT), device)
        case.fit(fresh)
        post = fresh.posterior(_inputs((3, case.d), device))
        _on(post.mean, device)
        _finite(post.mean, "mean after fit")

    checks: dict[str, Check] = {"posterior": posterior, "grad": grad, "state_dict": state_dict}
    if case.joint:
        checks["joint"] = joint
    if case.noise is not None:
        checks["noise"] = noise
    if case.fit is not None:
        checks["fit"] = fit
    return checks


def estimator_checks(case: Any, device: torch.device) -> dict[str, Check]:
    def fit_predict() -> str:
        est = case.make()
        if "device" not in est.get_params():
            return "no device parameter: CPU only"
        est.set_params(device=str(device))
        X, y = case.data()
        est.fit(X, y)
        post = est.posterior(X[:7])
        _finite(post.mean, "posterior mean")
        out = est.predict_proba(X[:7]) if case.task == "classification" else est.predict(X[:7])
        if not bool(torch.isfinite(torch.as_tensor(out)).all()):
            raise AssertionError("predictions not finite")
        return "ok"

    return {"fit_predict": fit_predict}


def run_checks(label: str, checks: dict[str, Check]) -> list[tuple[str, str, str]]:
    """Run every check; one printed table row each, ``ok`` or ``FAIL: <the exception>``."""
    rows = []
    for check, fn in checks.items():
        try:
            note = fn()
            status = "ok" + (f" ({note})" if note and note != "ok" else "")
        except Exception as err:  # noqa: BLE001 - every failure goes in the table
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            status = "FAIL: " + last[:160]
        rows.append((label, check, status))
        print(f"| {label} | {check} | {status} |", flush=True)
    return rows


def run_contract(device: torch.device, pattern: str | None) -> int:
    from cases import all_cases

    models, estimators = all_cases()
    rows: list[tuple[str, str, str]] = []
    for kind, cases, make in (
        ("model", models, model_checks),
        ("estimator", estimators, estimator_checks),
    ):
        for case in cases:
            if pattern and not any(part in case.name for part in pattern.split(",")):
                continue
            rows += run_checks(f"{kind} {case.name}", make(case, device))
    failures = sum(status.startswith("FAIL") for *_, status in rows)
    print(f"\ncontract on {device}: {len(rows) - failures} ok, {failures} failed")
    return failures


# -- part 2: timings ------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocations, kernel compilation, caches)
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rbf(dtype: torch.dtype, device: torch.device) -> ScaleKernel:
    return ScaleKernel(RBFKernel(ard_num_dims=3)).to(device=device, dtype=dtype)


def _regression(n: int, d: int, device: torch.device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, generator=gen, dtype=torch.float64) * 4 - 2
    y = torch.sin(X).sum(-1) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return X.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


Setup = Callable[[torch.device], Callable[[], Any]]


def workloads(quick: bool) -> dict[str, tuple[str, Setup, int]]:
    """name -> (size label, setup(device) -> one timed call, steps per call)."""
    from bdl.lastlayer import VBLLNetwork, VBLLRegression
    from gp import kernel_matvec
    from gp.sparse import SVGP, SWSGP, select_inducing_points
    from gp.statespace import StateSpaceGP

    n_mv = 2_000 if quick else 50_000
    n_ss = 500 if quick else 200_000
    n_sp, batch, m_svgp, m_sw = (2_048, 256, 64, 256) if quick else (32_768, 4_096, 1_024, 8_192)

    def matvec(backend: str) -> Setup:
        def setup(device: torch.device) -> Callable[[], Any]:
            X, _ = _regression(n_mv, 3, device)
            V = torch.randn(n_mv, 1, device=device)
            kernel = _rbf(torch.float32, device)
            return lambda: kernel_matvec(kernel, X, X, V, backend=backend)

        return setup

    def statespace(device: torch.device) -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(0)
        t = torch.sort(torch.rand(n_ss, generator=gen, dtype=DT) * n_ss / 10).values
        y = torch.sin(t) + 0.3 * torch.randn(n_ss, generator=gen, dtype=DT)
        kernel = ScaleKernel(MaternKernel(nu=1.5))
        model = StateSpaceGP(kernel, noise=0.05, method="parallel").to(device=device, dtype=DT)
        t, y = t.to(device), y.to(device)

        def call() -> None:
            model.zero_grad()
            model.log_marginal_likelihood(t, y, method="parallel").backward()

        return call

    def sparse(kind: str) -> Setup:
        def setup(device: torch.device) -> Callable[[], Any]:
            X, y = _regression(n_sp, 3, device)
            if kind == "svgp":
                model = SVGP.from_data(X, y, m_svgp, seed=0)
            else:
                Z = select_inducing_points(X, m_sw, seed=0)
                model = SWSGP(_rbf(torch.float32, device), Z, num_neighbors=32).to(device)
            return lambda: model.fit((X, y), epochs=1, batch_size=batch, seed=0)

        return setup

    def vbll(device: torch.device) -> Callable[[], Any]:
        X, y = _regression(n_sp, 10, device)
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(10, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        net = VBLLNetwork(body, VBLLRegression(512, 1)).to(device)
        return lambda: net.fit((X, y), epochs=1, batch_size=batch, seed=0)

    steps = n_sp // batch  # a fit of one epoch takes this many steps
    table = {
        "kernel_matvec (tiled torch)": (f"n = m = {n_mv}, d = 3", matvec("torch"), 1),
        "state-space LML + grad (parallel scan)": (f"n = {n_ss}, Matern-3/2", statespace, 1),
        "SVGP training step": (f"M = {m_svgp}, B = {batch}", sparse("svgp"), steps),
        "SWSGP training step": (f"M = {m_sw}, H = 32, B = {batch}", sparse("swsgp"), steps),
        "VBLL network training step": (f"2x512 body, B = {batch}", vbll, steps),
    }
    try:
        import pykeops  # noqa: F401

        table["kernel_matvec (KeOps)"] = (f"n = m = {n_mv}, d = 3", matvec("keops"), 1)
    except ImportError:
        pass
    return table


def run_timings(device: torch.device, quick: bool, reps: int, pattern: str | None) -> None:
    cpu = torch.device("cpu")
    print(f"\n| workload | size | CPU ({torch.get_num_threads()} threads) | {device} | speed-up |")
    print("|---|---|---|---|---|")
    for name, (size, setup, steps) in workloads(quick).items():
        if pattern and pattern.lower() not in name.lower():
            continue
        cells = []
        for where in (cpu, device):
            if "KeOps" in name and where.type == "cpu":
                cells.append(None)  # KeOps on the CPU is not a meaningful baseline
                continue
            try:
                cells.append(median_seconds(setup(where), where, reps) / steps)
            except Exception as err:  # noqa: BLE001
                print(f"  {name} on {where}: {type(err).__name__}: {err}")
                cells.append(None)
        fmt = ["-" if c is None else f"{1e3 * c:.3f} ms" for c in cells]
        ratio = "-" if None in cells else f"{cells[0] / cells[1]:.1f}x"
        print(f"| {name} | {size} | {fmt[0]} | {fmt[1]} | {ratio} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument(
        "-k", dest="pattern", help="only contract cases whose name contains one of these (a,b)"
    )
    parser.add_argument("-t", dest="timing", help="only timings whose name contains it")
    parser.add_argument("--skip-contract", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}, "
            f"cuda build: {torch.version.cuda}); nothing to check. "
            "Run it on a machine with a GPU, or pass --device cpu for a dry run on the CPU."
        )
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {device}: {name}; torch {torch.__version__}")
    failures = 0
    if not args.skip_contract:
        print("\n| case | check | result |\n|---|---|---|")
        failures = run_contract(device, args.pattern)
    if not args.skip_timings:
        run_timings(device, args.quick, 1 if args.quick else args.reps, args.timing)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

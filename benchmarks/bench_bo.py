"""Bayesian optimisation: ``bdl.bo.BayesOpt`` with every surrogate beside BoTorch's own loop.

Protocol (issue 11, item 5). BoTorch test functions, minimised (``negate=False``): Branin
(d = 2, optimum 0.397887), Hartmann-6 (-3.32237) and Ackley-10 (0). Each run starts from
2 (d + 1) scrambled Sobol points (``BayesOpt``'s own initial design for the seed, used by the
BoTorch loop too) and then makes 30 iterations of q = 1 (60 on Ackley); seeds 0..9. Rows of a
problem run side by side in the same process, their order alternating from seed to seed
(reversed on odd seeds), so slow drifts of the shared machine hit every row alike:

- ``botorch``: BoTorch's own loop: ``SingleTaskGP`` with its default priors,
  ``input_transform=Normalize(d, bounds=bounds)``, ``outcome_transform=Standardize(1)``,
  ``fit_gpytorch_mll``, ``qLogExpectedImprovement`` of ``-f`` (best_f = best ``-f`` so far),
  ``optimize_acqf(num_restarts=10, raw_samples=512)``; ``torch.manual_seed`` per iteration;
- ``gp``, ``svgp``, ``vbll``, ``sgmcmc``: ``BayesOpt(bounds, surrogate=..., acquisition="qlogei",
  q=1, seed=s)`` with its defaults (refit every iteration, 10 restarts, 512 raw samples);
- ``vbll-ts``: ``BayesOpt(surrogate="vbll", acquisition="ts")``.

Seconds per iteration are the surrogate fit plus the proposal (``BayesOpt.history["seconds"]``
without the initial design; the same span of the BoTorch loop), not the objective. One torch
thread (``torch.set_num_threads(1)``) and one BLAS/OpenMP thread (``OMP_NUM_THREADS`` etc. set
before numpy loads, and ``threadpoolctl``). Reported per problem and row: median and quartiles
of the final simple regret (best found minus optimum), median over seeds of the mean seconds per
iteration, and our exact GP's s/iter over BoTorch's (ratio of medians and median of per-seed
ratios). Targets: ``gp`` median final regret <= ``botorch``'s on each problem and s/iter <= 1.0x.

Large-budget run (``--large``): Hartmann-6, q = 10, 100 batches (1,000 evaluations after the 14
initial points), seed 0; rows ``surrogate[-acquisition]@k`` (qlogei unless named, refit every
k batches, conditioned on the new observations in between), default ``vbll@5``, ``svgp@5`` and
``gp@1``, e.g. ``svgp-ts@5`` for Thompson sampling; seconds per batch against the number of
observations. Target: VBLL or SVGP under 1 s per iteration while the
exact GP's growth is reported. ``--budget-s`` stops a row once it has spent that long.

Every run is appended to ``benchmarks/out/bo_runs.jsonl`` (``bo_large.jsonl``); the tables
(``benchmarks/out/bo.md``, ``bo_large.md``) and the figure ``benchmarks/figures/bo_regret.png``
are rebuilt from those files (the last run of each problem/row/seed counts), so a protocol can be
run in pieces.

Usage::

    python benchmarks/bench_bo.py [--seeds 10] [--first-seed 0] [--rows branin:botorch,gp]
        [--skip ackley] [--iters 3]              # --iters: quick runs, kept out of the tables
    python benchmarks/bench_bo.py --large [--batches 100] [--large-rows vbll@5,svgp@5,gp@1]
        [--budget-s 600]
    python benchmarks/bench_bo.py --report       # tables and figure from the recorded runs

Row keys: ``{branin,hartmann6,ackley10}:{botorch,gp,svgp,vbll,sgmcmc,vbll-ts}``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread: before numpy and torch load

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from botorch.test_functions import Ackley, Branin, Hartmann  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bdl.bo import BayesOpt  # noqa: E402

RUNS = C.OUT_DIR / "bo_runs.jsonl"
LARGE_RUNS = C.OUT_DIR / "bo_large.jsonl"
FIGURE = C.ROOT / "benchmarks" / "figures" / "bo_regret.png"


@dataclass(frozen=True)
class Problem:
    name: str
    label: str
    make: Callable[[], torch.nn.Module]
    iters: int
    optimum: float


PROBLEMS = {
    p.name: p
    for p in (
        Problem("branin", "Branin (d = 2)", lambda: Branin(negate=False), 30, 0.397887),
        Problem("hartmann6", "Hartmann-6", lambda: Hartmann(dim=6, negate=False), 30, -3.32237),
        Problem("ackley10", "Ackley-10", lambda: Ackley(dim=10, negate=False), 60, 0.0),
    )
}
#: row -> (surrogate, acquisition) of BayesOpt; "botorch" is BoTorch's own loop
METHODS: dict[str, tuple[str, str] | None] = {
    "botorch": None,
    "gp": ("gp", "qlogei"),
    "svgp": ("svgp", "qlogei"),
    "vbll": ("vbll", "qlogei"),
    "sgmcmc": ("sgmcmc", "qlogei"),
    "vbll-ts": ("vbll", "ts"),
}
LABELS = {
    "botorch": "BoTorch SingleTaskGP + qLogEI",
    "gp": "**ours: gp + qlogei**",
    "svgp": "ours: svgp + qlogei",
    "vbll": "ours: vbll + qlogei",
    "sgmcmc": "ours: sgmcmc + qlogei",
    "vbll-ts": "ours: vbll + ts",
}
CHECKPOINTS = (100, 250, 500, 1000)


# ------------------------------------------------------------------------------------ runs


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 7]).generate_state(1)[0] % 2**31)


def botorch_loop(problem: Problem, seed: int, iters: int) -> tuple[np.ndarray, list[float]]:
    """BoTorch's own loop from ``BayesOpt``'s initial design; (values, seconds per batch)."""
    from botorch import fit_gpytorch_mll
    from botorch.acquisition import qLogExpectedImprovement
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    f = problem.make()
    bounds = f.bounds.to(torch.float64)
    d = bounds.shape[1]
    X = torch.as_tensor(BayesOpt(bounds, seed=seed)._init_design, dtype=torch.float64)
    with torch.no_grad():
        Y = -f(X).unsqueeze(-1)  # maximise -f
    seconds = [0.0]
    for step in range(1, iters + 1):
        start = time.perf_counter()
        torch.manual_seed(_step_seed(seed, step))
        model = SingleTaskGP(
            X, Y, input_transform=Normalize(d, bounds=bounds), outcome_transform=Standardize(1)
        )
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        acq = qLogExpectedImprovement(model, best_f=Y.max())
        candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=10, raw_samples=512)
        seconds.append(time.perf_counter() - start)
        candidate = candidate.detach()
        with torch.no_grad():
            y = -f(candidate).unsqueeze(-1)
        X, Y = torch.cat([X, candidate]), torch.cat([Y, y])
    return (-Y[:, 0]).numpy(), seconds


def ours_loop(problem: Problem, method: str, seed: int, iters: int) -> tuple[np.ndarray, list]:
    surrogate, acquisition = METHODS[method]  # type: ignore[misc]
    f = problem.make()
    bo = BayesOpt(f.bounds, surrogate=surrogate, acquisition=acquisition, q=1, seed=seed)
    bo.run(f, iters)
    return bo.y.copy(), bo.history["seconds"].tolist()


def run_one(problem: Problem, method: str, seed: int, iters: int) -> dict:
    """One run; a run that raises is recorded with its error (and left out of the tables)."""
    start = time.perf_counter()
    record = {"problem": problem.name, "method": method, "seed": seed, "iters": iters}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optimize_acqf's restarts, input-scaling notes
            if method == "botorch":
                y, seconds = botorch_loop(problem, seed, iters)
            else:
                y, seconds = ours_loop(problem, method, seed, iters)
    except Exception as err:  # noqa: BLE001 - a failed run is a result to report
        return record | {"error": f"{type(err).__name__}: {err}"[:300]}
    best = np.minimum.accumulate(y)
    return record | {
        "regret": (best - problem.optimum).tolist(),
        "seconds": seconds,
        "wall": time.perf_counter() - start,
    }


def warm_up(methods: list[str]) -> None:
    """One short untimed run of each row (imports, first-call costs)."""
    for method in methods:
        run_one(PROBLEMS["branin"], method, 12345, 1)


# --------------------------------------------------------------------------------- records


def append(path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def load(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_runs(iters_override: int | None) -> dict[tuple[str, str], dict[int, dict]]:
    """(problem, method) -> seed -> the last recorded run at the protocol (or given) budget."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for r in load(RUNS):
        problem = PROBLEMS.get(r["problem"])
        if problem is None or r["iters"] != (iters_override or problem.iters):
            continue
        out.setdefault((r["problem"], r["method"]), {})[r["seed"]] = r
    return out


def split_failed(by_seed: dict[int, dict]) -> tuple[dict[int, dict], list[int]]:
    """(the runs that finished, the seeds whose run raised)."""
    ok = {k: r for k, r in by_seed.items() if "error" not in r}
    return ok, sorted(k for k in by_seed if k not in ok)


# --------------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _per_iter(r: dict) -> float:
    return statistics.fmean(r["seconds"][1:])


def report(iters_override: int | None, threads: str) -> str:
    runs = latest_runs(iters_override)
    parts = [
        "# Bayesian optimisation (issue 11, item 5)",
        "",
        f"{threads}; one BLAS/OpenMP thread (OMP/MKL/OPENBLAS_NUM_THREADS=1, threadpoolctl).",
        "Final simple regret = best found - optimum after the whole budget: median [quartiles] "
        "over seeds. s/iter: mean seconds per iteration (fit + proposal) of each run, median over "
        "seeds. x BoTorch: ratio of the medians; paired: median over seeds of the per-seed ratio.",
    ]
    for problem in PROBLEMS.values():
        rows, failed = [], []
        for m in METHODS:
            if (problem.name, m) in runs:
                ok, bad = split_failed(runs[(problem.name, m)])
                if ok:
                    rows.append((m, ok))
                if bad:
                    errors = {runs[(problem.name, m)][k]["error"] for k in bad}
                    failed.append(f"{m}: seed(s) {bad} raised {'; '.join(sorted(errors))}")
        if not rows and not failed:
            continue
        iters = iters_override or problem.iters
        n_init = 2 * (problem.make().dim + 1)
        parts += [
            "",
            f"## {problem.label}: {n_init} Sobol + {iters} iterations, optimum {problem.optimum}",
            "",
        ]
        ref = dict(rows).get("botorch")
        ref_s = statistics.median(_per_iter(r) for r in ref.values()) if ref else None
        table = []
        for method, by_seed in rows:
            final = [r["regret"][-1] for r in by_seed.values()]
            q1, med, q3 = np.quantile(final, [0.25, 0.5, 0.75])
            s = statistics.median(_per_iter(r) for r in by_seed.values())
            ratio = paired = ""
            if ref_s is not None:
                ratio = f"{s / ref_s:.2f}"
                common = [k for k in by_seed if k in ref]
                if common:
                    paired = f"{statistics.median(_per_iter(by_seed[k]) / _per_iter(ref[k]) for k in common):.2f}"  # noqa: E501
            seeds = sorted(by_seed)
            seed_text = (
                f"{seeds[0]}-{seeds[-1]}"
                if seeds == list(range(seeds[0], seeds[-1] + 1))
                else ",".join(map(str, seeds))
            )  # noqa: E501
            table.append(
                [LABELS[method], f"{len(seeds)} ({seed_text})", _fmt(med),
                 f"[{_fmt(q1)}, {_fmt(q3)}]", f"{s:.3f}", ratio, paired]
            )  # fmt: skip
        parts.append(
            C.markdown_table(
                [
                    "method",
                    "seeds",
                    "final regret (median)",
                    "[q1, q3]",
                    "s/iter",
                    "x BoTorch",
                    "paired",
                ],
                table,
            )  # fmt: skip
        )
        if failed:
            parts += ["", "Failed runs (not in the table): " + " | ".join(failed)]
        gp_runs = dict(rows).get("gp")
        if ref and gp_runs:
            gp_med = statistics.median(r["regret"][-1] for r in gp_runs.values())
            ref_med = statistics.median(r["regret"][-1] for r in ref.values())
            gp_s = statistics.median(_per_iter(r) for r in gp_runs.values())
            parts += [
                "",
                f"Targets: gp median regret {_fmt(gp_med)} vs BoTorch {_fmt(ref_med)}: "
                f"{'met' if gp_med <= ref_med else 'MISSED'}; s/iter {gp_s / ref_s:.2f}x: "
                f"{'met' if gp_s <= ref_s else 'MISSED'}.",
            ]
    return "\n".join(parts) + "\n"


def figure(iters_override: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = latest_runs(iters_override)
    problems = [p for p in PROBLEMS.values() if any((p.name, m) in runs for m in METHODS)]
    if not problems:
        return
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for method in METHODS:
            by_seed = split_failed(runs.get((problem.name, method), {}))[0]
            if not by_seed:
                continue
            curves = np.maximum(np.array([r["regret"] for r in by_seed.values()]), 1e-8)
            q1, med, q3 = np.quantile(curves, [0.25, 0.5, 0.75], axis=0)
            evals = np.arange(1, curves.shape[1] + 1)
            seeds = f"{len(by_seed)} seed" + "s" * (len(by_seed) > 1)
            (line,) = ax.semilogy(evals, med, label=f"{method} ({seeds})")
            ax.fill_between(evals, q1, q3, color=line.get_color(), alpha=0.12)
        n_init = 2 * (problem.make().dim + 1)
        ax.axvline(n_init + 0.5, color="0.7", lw=0.8)
        ax.set_title(problem.label)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("best-so-far simple regret (median, IQR)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- large budget


def large_run(row: str, batches: int, budget_s: float, q: int = 10) -> dict:
    name, _, refit = row.partition("@")
    surrogate, _, acquisition = name.partition("-")
    f = Hartmann(dim=6, negate=False)
    bo = BayesOpt(f.bounds, surrogate=surrogate, acquisition=acquisition or "qlogei", q=q,
                  seed=0, refit_every=int(refit or 1))  # fmt: skip
    with torch.no_grad():
        X = bo.ask()
        bo.tell(X, f(torch.as_tensor(X)).numpy())
    n_obs, seconds, spent, truncated = [], [], 0.0, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(1, batches + 1):
            n = len(bo.y)
            X = bo.ask()
            with torch.no_grad():
                bo.tell(X, f(torch.as_tensor(X)).numpy())
            dt = float(bo.history["seconds"][-1])
            n_obs.append(n)
            seconds.append(dt)
            spent += dt
            print(
                f"  large {row:8s} batch {b:3d} n={n:4d}: {dt:7.3f} s  best "
                f"{bo.best_y:.5f}  (spent {spent:.0f} s)",
                flush=True,
            )
            if spent > budget_s and b < batches:
                truncated = True
                break
    return {
        "row": row,
        "q": q,
        "batches": batches,
        "n_obs": n_obs,
        "seconds": seconds,
        "best": bo.best_y,
        "truncated": truncated,
    }


def large_report() -> str:
    latest: dict[str, dict] = {}
    for r in load(LARGE_RUNS):
        latest[r["row"]] = r
    if not latest:
        return ""
    header = ["surrogate (refit every)", "batches run", "best found"]
    header += [f"s/batch at n ~ {c}" for c in CHECKPOINTS]
    header += ["median s/batch", "max s/batch", "total s"]
    table = []
    for row, r in latest.items():
        n, s = np.array(r["n_obs"]), np.array(r["seconds"])
        refit = int(row.partition("@")[2] or 1)
        cells = []
        for c in CHECKPOINTS:
            # the refit cycle (``refit`` batches, at least 3) whose observations are nearest c
            if n.size == 0 or c > n[-1] + r["q"]:
                cells.append("-")
                continue
            i = int(np.argmin(np.abs(n - c)))
            window = s[max(0, i - max(refit, 3) // 2) : i + max(refit, 3) - max(refit, 3) // 2]
            cells.append(f"{window.mean():.2f} (n={n[i]})")
        done = f"{len(s)}/{r['batches']}" + (" (stopped: budget)" if r["truncated"] else "")
        table.append([row.replace("@", " (") + ")", done, f"{r['best']:.5f}", *cells,
                      f"{np.median(s):.2f}", f"{s.max():.2f}", f"{s.sum():.0f}"])  # fmt: skip
    return (
        "\n".join(
            [
                "",
                "## Large budget: Hartmann-6, q = 10, seed 0",
                "",
                "Rows: surrogate-acquisition (refit every k batches; qlogei when no acquisition "
                "is named). s/batch: mean seconds per batch (fit or conditioning + proposal) over "
                "the refit cycle (at least 3 batches) whose observation count is nearest the "
                "checkpoint; median and max over every batch run.",
                "",
                C.markdown_table(header, table),
            ]
        )
        + "\n"
    )


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds F..F+S-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rows", default="", help="comma-separated substrings of row keys")
    parser.add_argument("--skip", default="", help="comma-separated substrings to leave out")
    parser.add_argument("--iters", type=int, default=None, help="iterations (quick runs)")
    parser.add_argument("--report", action="store_true", help="only rebuild tables and figure")
    parser.add_argument("--large", action="store_true", help="the large-budget run")
    parser.add_argument("--batches", type=int, default=100, help="large run: batches of q=10")
    parser.add_argument("--large-rows", default="vbll@5,svgp@5,gp@1")
    parser.add_argument("--budget-s", type=float, default=600.0, help="large run: s per row")
    args = parser.parse_args()
    threads = C.one_thread()
    threadpool_limits(1)
    print(threads, flush=True)

    if args.large:
        for row in [r for r in args.large_rows.split(",") if r]:
            append(LARGE_RUNS, large_run(row, args.batches, args.budget_s))
            text = large_report()
            C.write_out("bo_large.md", text)
        print(text, flush=True)
        return

    if not args.report:
        patterns = [p for p in args.rows.split(",") if p]
        skip = [p for p in args.skip.split(",") if p]
        keys = [
            f"{p}:{m}"
            for p in PROBLEMS
            for m in METHODS
            if C.selected(f"{p}:{m}", patterns) and not (skip and C.selected(f"{p}:{m}", skip))
        ]
        if not keys:
            raise SystemExit(f"no row matches {args.rows!r}")
        warm_up(sorted({k.split(":")[1] for k in keys}, key=list(METHODS).index))
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for name, problem in PROBLEMS.items():
            methods = [k.split(":")[1] for k in keys if k.startswith(name + ":")]
            if not methods:
                continue
            iters = args.iters or problem.iters
            for seed in seeds:
                for method in methods if seed % 2 == 0 else methods[::-1]:
                    r = run_one(problem, method, seed, iters)
                    append(RUNS, r)
                    if "error" in r:
                        print(f"  {name}:{method:8s} seed {seed}: FAILED {r['error']}", flush=True)
                        continue
                    print(
                        f"  {name}:{method:8s} seed {seed}: regret {_fmt(r['regret'][-1]):>9s}"
                        f"  {_per_iter(r):.3f} s/iter  ({r['wall']:.0f} s)",
                        flush=True,
                    )
            C.write_out("bo.md", report(args.iters, threads))  # partial tables as it goes
    text = report(args.iters, threads)
    path = C.write_out("bo.md", text)
    if args.report and LARGE_RUNS.exists():
        C.write_out("bo_large.md", large_report())
    figure(args.iters)
    print(text + f"\nwritten to {path} and {FIGURE}", flush=True)


if __name__ == "__main__":
    main()

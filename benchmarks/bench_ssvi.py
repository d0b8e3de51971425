"""Sparse subspace VI (issue 12, items 4 and 6): quality on digits and wall time of sparse layers.

One thread (``_common.one_thread()``: ``torch.set_num_threads(1)``). Two parts.

**Quality** (``--part quality``). The protocol split of digits (``_common.load_split``: 80/20,
``random_state=0``, stratified, pixels standardised with training statistics), batch 64,
40 epochs, training seeds 0..S-1 (mean ± sd), two architectures:

- ``mlp``: 64-128-128-10 ReLU MLP;
- ``cnn``: the 64 pixels as a 1x8x8 image, Conv(1,16,3,p1)-ReLU-Conv(16,32,3,p1)-ReLU-
  MaxPool2-Flatten-Linear(512,128)-ReLU-Linear(128,10) (``sparsify`` keeps the first conv dense).

Rows, side by side in one run (the order of the rows alternates from seed to seed):

- ``ssvi``: ``sparsify(arch, 0.1, seed=s, prior_std=1)`` trained by
  ``SSVI(update_every=25, alpha=0.3, kl_scale=1)`` at lr 3e-3;
- ``vi-1e-3`` / ``vi-3e-3``: dense mean-field VI, i.e. ``sparsify(arch, 1.0, ...)`` trained by
  the same ``SSVI`` trainer and epochs (no topology updates at density 1; same local
  reparameterisation, KL warm-up and KL scale) at lr 1e-3 and 3e-3;
- ``bayesian-torch``: ``dnn_to_bnn`` (Reparameterization, prior N(0, 1), rho_init -3) trained on
  cross-entropy + KL / N, Adam lr 1e-3, 32 forward passes at test time; run only if
  ``bayesian_torch`` imports (it is not installed beside torch 2.13 CPU here: pip would pull
  torchvision and tensorboard, see RESULTS.md).

Predictions: ``net.posterior(x_test).probs`` (32 weight draws, seed 0). Metrics: accuracy, NLL,
top-label ECE with 15 bins, Brier; training seconds (``fit`` only); from
``bdl.ssvi.flops(net, batch, update_every=25)``: training and inference FLOPs and parameter
memory relative to dense mean-field VI (a mean and a scale per weight, no index; the density-1
network of ``sparsify`` itself stores an int32 index per weight, so its memory ratio is 1.5).
Targets (issue 12, item 6) at density 0.1, against dense VI: accuracy within 3 points, NLL and
ECE at most dense + 0.01, training FLOPs <= 0.2x, parameter memory <= 0.2x.

**Wall time** (``--part walltime``). A single ``SparseBayesLinear(w, w)`` for widths ``w`` and
densities ``d`` (default {256, 1024, 4096} x {0.01, 0.05, 0.1, 0.3, 1.0}):

- inference: ``layer.eval()`` under ``torch.no_grad()`` (one pass on the mean weights), batch
  256, through the dense zero-filled kernel (``sparse_kernel=False``: scatter the active means
  into a dense matrix, ``F.linear``) and the CSR kernel (``sparse_kernel=True``); references:
  dense mean-field VI = the density-1 layer with the dense kernel, and ``F.linear`` on a stored
  dense weight (no scatter);
- one training step: ``zero_grad`` + local-reparameterisation forward + mean squared output +
  KL / 1000 + backward + Adam step, batch 64. Training always runs on the dense zero-filled
  kernel (the CSR path is inference-only), so the ratio to density 1 shows what the sparse
  storage saves (scatter, KL, Adam on s instead of D entries), not FLOPs. Reference ``ref``:
  a dense mean-field layer of this script storing dense ``mu``/``rho`` matrices (no index,
  no scatter), same local reparameterisation, KL and Adam.

All variants of one width are timed in interleaved repetitions (each repetition times every
variant once, the order reversed on odd repetitions; a repetition repeats a call until it
lasts >= 20 ms), after warm-up; medians of ``--reps`` (default 21) repetitions.

Usage: ``python benchmarks/bench_ssvi.py [--part all|quality|walltime] [--seeds 5] [--quick]
[--rows mlp:ssvi,cnn] [--diagnostic] [--widths 256,1024,4096] [--densities 0.01,0.05,0.1,0.3,1]
[--reps 21]``. Quality row keys: ``{mlp,cnn}:{ssvi,vi-1e-3,vi-3e-3,bayesian-torch}``;
``--diagnostic`` adds ``{mlp,cnn}:ssvi-lr1e-3`` (SSVI at lr 1e-3) and writes
``ssvi_quality_diagnostic.md``. ``--quick``: one seed, 5 epochs, widths 256 and 1024,
5 repetitions (smoke run). Writes ``benchmarks/out/ssvi_quality.md`` and
``benchmarks/out/ssvi_walltime.md`` (``*_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import _common as C
import torch
import torch.nn.functional as F
from torch import nn

from bdl.ssvi import SSVI, SparseBayesLinear, flops, sparsify

DENSITY = 0.1
UPDATE_EVERY = 25
ALPHA = 0.3
KL_SCALE = 1.0
PRIOR_STD = 1.0
BATCH, EPOCHS = C.PROTOCOL["digits"]
NUM_DRAWS = 32
# targets at density 0.1 against dense VI
ACC_DROP, NLL_SLACK, ECE_SLACK, TRAIN_FLOPS, PARAM_MEMORY = 0.03, 0.01, 0.01, 0.2, 0.2
INFER_BATCH, TRAIN_BATCH = 256, 64
MIN_REP_S = 0.02


# ---------------------------------------------------------------------------- architectures


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


ARCHS: dict[str, Callable[[], nn.Module]] = {"mlp": make_mlp, "cnn": make_cnn}


# ----------------------------------------------------------------------------- quality rows


@dataclass
class Method:
    key: str
    label: str
    run: Callable[[str, C.Split, int, int], dict[str, float]]  # (arch, split, seed, epochs)


def ours(density: float, lr: float) -> Callable[[str, C.Split, int, int], dict[str, float]]:
    """``sparsify(arch, density)`` trained by the SSVI trainer at ``lr``."""

    def run(arch: str, split: C.Split, seed: int, epochs: int) -> dict[str, float]:
        x, y, x_test, y_test = split.tensors()
        net = sparsify(ARCHS[arch](), density, task="classification", seed=seed,
                       prior_std=PRIOR_STD)  # fmt: skip
        trainer = SSVI(net, update_every=UPDATE_EVERY, alpha=ALPHA, kl_scale=KL_SCALE)
        t0 = time.perf_counter()
        trainer.fit((x, y), epochs=epochs, lr=lr, batch_size=BATCH, seed=seed)
        seconds = time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            probs = net.posterior(x_test).probs
        total = flops(net, x[:BATCH], update_every=UPDATE_EVERY)["total"]
        return {
            **C.classification_metrics(probs, y_test),
            "time": seconds,
            "density": net.density,
            "train_ratio": total["train_ratio"],
            "inference_ratio": total["inference_ratio"],
            "param_ratio": total["param_ratio"],
            "param_kb": total["param_bytes"] / 1024,
            "dense_kb": total["dense_param_bytes"] / 1024,
            "updates": len(trainer.updates_),
        }

    return run


BAYESIAN_TORCH = importlib.util.find_spec("bayesian_torch") is not None
BAYESIAN_TORCH_ABSENT = (
    "not run: bayesian-torch is not installed (`pip install bayesian-torch` beside torch "
    "2.13.0+cpu would pull torchvision 0.28.0 and tensorboard)"
)


def bayesian_torch_row(arch: str, split: C.Split, seed: int, epochs: int) -> dict[str, float]:
    """bayesian-torch's ``dnn_to_bnn`` (its README's recipe, KL / N per datum), Adam lr 1e-3."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    x, y, x_test, y_test = split.tensors()
    n = x.shape[0]
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    dnn_to_bnn(model, {
        "prior_mu": 0.0, "prior_sigma": PRIOR_STD, "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0, "type": "Reparameterization", "moped_enable": False,
        "moped_delta": 0.5,
    })  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH):
            idx = order[start : start + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx]) + get_kl_loss(model) / n
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probs = torch.stack([model(x_test).softmax(-1) for _ in range(NUM_DRAWS)]).mean(0)
    nan = float("nan")
    return {
        **C.classification_metrics(probs, y_test),
        "time": seconds,
        "density": 1.0,
        "train_ratio": nan,
        "inference_ratio": nan,
        "param_ratio": nan,
        "param_kb": nan,
        "dense_kb": nan,
        "updates": 0,
    }


METHODS = [
    Method("ssvi", f"**SSVI density {DENSITY:g}, lr 3e-3**", ours(DENSITY, 3e-3)),
    Method("vi-1e-3", "dense MFVI (density 1), lr 1e-3", ours(1.0, 1e-3)),
    Method("vi-3e-3", "dense MFVI (density 1), lr 3e-3", ours(1.0, 3e-3)),
    Method("bayesian-torch", "bayesian-torch dnn_to_bnn, lr 1e-3", bayesian_torch_row),
]
# --diagnostic: SSVI at the dense-VI learning rate (is lr 3e-3 what costs the NLL?)
DIAGNOSTIC = [
    Method("ssvi-lr1e-3", f"SSVI density {DENSITY:g}, lr 1e-3 (diagnostic)", ours(DENSITY, 1e-3))
]
QUALITY_COLUMNS = [
    ("acc", "acc", 3),
    ("nll", "NLL", 4),
    ("ece", "ECE", 4),
    ("brier", "Brier", 4),
    ("time", "train s", 1),
]


def run_quality(args: argparse.Namespace, threads: str) -> str:
    methods_all = METHODS + DIAGNOSTIC * args.diagnostic
    split = C.load_split("digits")
    seeds = list(range(args.seeds)) if not args.quick else [0]
    epochs = 5 if args.quick else args.epochs
    keys = [f"{a}:{m.key}" for a in ARCHS for m in methods_all]
    wanted = [k for k in keys if C.selected(k, args.rows)]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in wanted}
    skipped: dict[str, str] = {}
    for seed in seeds:
        for arch in ARCHS:
            methods = methods_all if seed % 2 == 0 else methods_all[::-1]
            for m in methods:
                key = f"{arch}:{m.key}"
                if key not in results:
                    continue
                if m.key == "bayesian-torch" and not BAYESIAN_TORCH:
                    skipped[key] = BAYESIAN_TORCH_ABSENT
                    continue
                r = m.run(arch, split, seed, epochs)
                results[key].append(r)
                print(
                    f"  seed {seed} {key:22s} acc {r['acc']:.3f} nll {r['nll']:.4f} "
                    f"ece {r['ece']:.4f} {r['time']:.1f}s density {r['density']:.3f} "
                    f"train FLOPs {r['train_ratio']:.3f}x params {r['param_ratio']:.3f}x",
                    flush=True,
                )

    lines = [
        "# SSVI quality on digits (issue 12, item 6)",
        "",
        f"{threads}. {'QUICK smoke run; ' * args.quick}digits protocol split (seed 0), batch "
        f"{BATCH}, {epochs} epochs, training seeds {seeds[0]}..{seeds[-1]} (mean ± sd), "
        f"{NUM_DRAWS} weight draws at test time; SSVI update_every {UPDATE_EVERY}, alpha "
        f"{ALPHA}, kl_scale {KL_SCALE}, prior N(0, {PRIOR_STD:g}). FLOP and memory ratios are "
        "against dense mean-field VI (bdl.ssvi.flops); training seconds under whatever load "
        "the machine had.",
    ]
    for arch in ARCHS:
        rows = []
        for m in methods_all:
            key = f"{arch}:{m.key}"
            if key in skipped:
                rows.append([m.label, skipped[key]] + [""] * (len(QUALITY_COLUMNS) + 4))
                continue
            rs = results.get(key)
            if not rs:
                continue
            row = [m.label, f"{statistics.fmean(r['density'] for r in rs):.3f}"]
            row += [C.mean_sd([r[c] for r in rs], d) for c, _, d in QUALITY_COLUMNS]
            row += [
                f"{statistics.fmean(r[c] for r in rs):.3f}"
                for c in ("train_ratio", "inference_ratio", "param_ratio")
            ]
            row.append(f"{statistics.fmean(r['param_kb'] for r in rs):.1f}")
            rows.append(row)
        header = ["method", "density"] + [h for _, h, _ in QUALITY_COLUMNS]
        header += ["train FLOPs ratio", "infer FLOPs ratio", "param memory ratio", "param KiB"]
        dense_kb = next(
            (r["dense_kb"] for k, rs in results.items() if k.startswith(arch) for r in rs[:1]),
            float("nan"),
        )
        lines += [
            "",
            f"## {arch} (dense mean-field VI parameter memory {dense_kb:.1f} KiB)",
            "",
            C.markdown_table(header, rows),
        ]
        lines += ["", targets_table(arch, results)]
    return "\n".join(lines)


def targets_table(arch: str, results: dict[str, list[dict[str, float]]]) -> str:
    """SSVI at density 0.1 against each dense-VI row: the five targets of item 6."""
    ssvi = results.get(f"{arch}:ssvi")
    if not ssvi:
        return ""
    mean = {c: statistics.fmean(r[c] for r in ssvi) for c in ssvi[0]}
    rows = []
    for ref in ("vi-1e-3", "vi-3e-3"):
        dense = results.get(f"{arch}:{ref}")
        if not dense:
            continue
        dmean = {c: statistics.fmean(r[c] for r in dense) for c in dense[0]}
        checks = [
            ("acc", dmean["acc"] - mean["acc"], ACC_DROP, "drop {:+.3f}"),
            ("NLL", mean["nll"] - dmean["nll"], NLL_SLACK, "{:+.4f}"),
            ("ECE", mean["ece"] - dmean["ece"], ECE_SLACK, "{:+.4f}"),
        ]
        row = [f"vs {ref}"]
        for _, value, bound, fmt in checks:
            row.append(fmt.format(value) + (" met" if value <= bound else " **missed**"))
        for c, bound in (("train_ratio", TRAIN_FLOPS), ("param_ratio", PARAM_MEMORY)):
            row.append(f"{mean[c]:.3f}x" + (" met" if mean[c] <= bound else " **missed**"))
        row.append(f"{mean['time'] / dmean['time']:.2f}x")
        rows.append(row)
    header = [
        f"{arch}: SSVI {DENSITY:g}",
        f"acc drop (<= {ACC_DROP:g})",
        f"NLL - dense (<= {NLL_SLACK:g})",
        f"ECE - dense (<= {ECE_SLACK:g})",
        f"train FLOPs (<= {TRAIN_FLOPS:g}x)",
        f"param memory (<= {PARAM_MEMORY:g}x)",
        "train wall time ratio",
    ]
    return C.markdown_table(header, rows)


# ------------------------------------------------------------------------------- wall time


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of every function; all timed in the same repetitions.

    Each repetition times every function once (order reversed on odd repetitions), repeating
    a call until the repetition lasts about ``MIN_REP_S`` (the count is fixed after warm-up).
    """
    inner = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        inner[key] = max(1, math.ceil(MIN_REP_S / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        for key in keys if r % 2 == 0 else keys[::-1]:
            fn, n = fns[key], inner[key]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[key].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def inference_fns(width: int, densities: list[float]) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(INFER_BATCH, width, generator=gen)
    fns: dict[str, Callable[[], None]] = {}
    for d in densities:
        torch.manual_seed(1)
        layer = SparseBayesLinear(width, width, density=d).eval()

        def call(layer: SparseBayesLinear = layer, sparse: bool = False) -> None:
            layer.sparse_kernel = sparse
            with torch.no_grad():
                layer(x)

        fns[f"dense@{d:g}"] = call
        fns[f"csr@{d:g}"] = lambda call=call: call(sparse=True)
    w = torch.randn(width, width, generator=gen) / math.sqrt(width)
    b = torch.zeros(width)

    def plain() -> None:
        with torch.no_grad():
            F.linear(x, w, b)

    fns["F.linear"] = plain
    return fns


def train_fns(width: int, densities: list[float]) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TRAIN_BATCH, width, generator=gen)
    fns: dict[str, Callable[[], None]] = {}
    for d in densities:
        torch.manual_seed(1)
        layer = SparseBayesLinear(width, width, density=d).train()
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)

        def step(layer: SparseBayesLinear = layer, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss = layer(x).pow(2).mean() + layer.kl_divergence() / 1000
            loss.backward()
            opt.step()

        fns[f"train@{d:g}"] = step
    ref = DenseLRTLinear(width, width)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-3)

    def step_ref() -> None:
        opt_ref.zero_grad(set_to_none=True)
        loss = ref(x).pow(2).mean() + ref.kl_divergence() / 1000
        loss.backward()
        opt_ref.step()

    fns["train-ref"] = step_ref
    return fns


class DenseLRTLinear(nn.Module):
    """Reference dense mean-field linear layer: dense ``mu``/``rho`` matrices (no index, no
    scatter), the same local reparameterisation and KL as ``SparseBayesLinear``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.mu = nn.Parameter(torch.randn(d_out, d_in) * math.sqrt(2.0 / d_in))
        self.rho = nn.Parameter(torch.full((d_out, d_in), math.log(math.expm1(1e-3))))
        self.bias_mu = nn.Parameter(torch.zeros(d_out))
        self.bias_rho = nn.Parameter(torch.full((d_out,), math.log(math.expm1(1e-3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.mu, self.bias_mu)
        var = F.linear(x * x, F.softplus(self.rho) ** 2, F.softplus(self.bias_rho) ** 2)
        return mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)

    def kl_divergence(self) -> torch.Tensor:
        kl = 0.0
        for mu, rho in ((self.mu, self.rho), (self.bias_mu, self.bias_rho)):
            ratio = F.softplus(rho) ** 2 / PRIOR_STD**2
            kl = kl + 0.5 * (ratio + mu**2 / PRIOR_STD**2 - 1.0 - ratio.log()).sum()
        return kl


def crossover(densities: list[float], ratios: list[float]) -> str:
    """Where CSR/dense-kernel crosses 1 on the density grid (log-linear interpolation)."""
    wins = [d for d, r in zip(densities, ratios, strict=True) if r < 1]
    if not wins:
        return "CSR never faster"
    if len(wins) == len(densities):
        return f"CSR faster at every density (up to {densities[-1]:g})"
    for i in range(len(densities) - 1):
        (d0, r0), (d1, r1) = (densities[i], ratios[i]), (densities[i + 1], ratios[i + 1])
        if r0 < 1 <= r1:
            t = (0 - math.log(r0)) / (math.log(r1) - math.log(r0))
            at = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
            return f"CSR faster up to d = {d0:g} (grid), crosses 1 at d ≈ {at:.2g}"
    return f"CSR faster at d in {wins} (not monotone)"


def run_walltime(args: argparse.Namespace, threads: str) -> str:
    widths = args.widths or ([256, 1024] if args.quick else [256, 1024, 4096])
    densities = sorted(args.densities)
    reps, warmup = (5, 1) if args.quick else (args.reps, 2)
    infer_rows, train_rows, cross_rows = [], [], []
    for w in widths:
        print(f"  width {w}: inference ...", flush=True)
        t = interleaved(inference_fns(w, densities), reps, warmup)
        base = t[f"dense@{densities[-1]:g}"] if densities[-1] == 1 else float("nan")
        ratios = []
        for d in densities:
            dense, csr = t[f"dense@{d:g}"], t[f"csr@{d:g}"]
            ratios.append(csr / dense)
            row = [w, f"{d:g}", f"{dense * 1e3:.3f}", f"{csr * 1e3:.3f}", f"{csr / dense:.2f}x"]
            row += [f"{dense / base:.2f}x", f"{csr / base:.2f}x", f"{t['F.linear'] * 1e3:.3f}"]
            infer_rows.append(row)
            print("   " + " | ".join(str(c) for c in row), flush=True)
        beats_vi = [d for d in densities if t[f"csr@{d:g}"] < base]
        beats_plain = [d for d in densities if t[f"csr@{d:g}"] < t["F.linear"]]
        cross_rows.append([w, crossover(densities, ratios), _grid(beats_vi), _grid(beats_plain)])
        print(f"  width {w}: training step ...", flush=True)
        t = interleaved(train_fns(w, densities), reps, warmup)
        tbase = t[f"train@{densities[-1]:g}"] if densities[-1] == 1 else float("nan")
        ref = t["train-ref"]
        for d in densities:
            step = t[f"train@{d:g}"]
            row = [w, f"{d:g}", f"{step * 1e3:.3f}", f"{step / tbase:.2f}x", f"{step / ref:.2f}x"]
            row.append(f"{ref * 1e3:.3f}")
            train_rows.append(row)
            print("   " + " | ".join(str(c) for c in row), flush=True)

    note = "QUICK smoke run; " * args.quick
    return "\n".join(
        [
            "# SSVI wall time: one SparseBayesLinear(w, w) (issue 12, item 4)",
            "",
            f"{threads}. {note}Medians over {reps} interleaved repetitions (all variants of a "
            f"width in the same repetitions) after {warmup} warm-up calls each.",
            "",
            f"## Inference: eval mode, torch.no_grad(), mean weights, batch {INFER_BATCH} (ms per "
            "call)",
            "",
            "dense kernel = active means scattered into a zero-filled dense matrix + F.linear "
            "(sparse_kernel=False); CSR = torch.sparse_csr_tensor @ x (sparse_kernel=True); "
            "dense VI = the density-1 layer on the dense kernel; F.linear = a stored dense "
            "weight, no scatter.",
            "",
            C.markdown_table(
                [
                    "width",
                    "density",
                    "dense kernel ms",
                    "CSR ms",
                    "CSR / dense kernel",
                    "dense kernel / dense VI",
                    "CSR / dense VI",
                    "F.linear ms",
                ],
                infer_rows,
            ),  # fmt: skip
            "",
            "## Crossover (CSR kernel against the dense product)",
            "",
            C.markdown_table(
                [
                    "width",
                    "CSR vs dense kernel at the same density",
                    "CSR beats dense VI at d",
                    "CSR beats plain F.linear at d",
                ],
                cross_rows,
            ),  # fmt: skip
            "",
            f"## One training step: LRT forward + backward + Adam, batch {TRAIN_BATCH} (dense "
            "zero-filled kernel at every density)",
            "",
            "ref = a dense mean-field layer storing dense mu/rho matrices (no index, no "
            "scatter), same LRT, KL and Adam.",
            "",
            C.markdown_table(
                [
                    "width",
                    "density",
                    "ms per step",
                    "ratio to dense VI (density 1)",
                    "ratio to ref",
                    "ref ms",
                ],
                train_rows,
            ),  # fmt: skip
        ]
    )


def _grid(ds: list[float]) -> str:
    return "none" if not ds else ", ".join(f"{d:g}" for d in ds)


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "quality", "walltime"], default="all")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..S-1")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--quick", action="store_true", help="smoke run (see the docstring)")
    parser.add_argument(
        "--rows", type=lambda s: s.split(","), default=None,
        help="quality row filter: comma-separated substrings of {mlp,cnn}:{method}",
    )  # fmt: skip
    parser.add_argument(
        "--widths", type=lambda s: [int(v) for v in s.split(",")], default=None,
        help="default 256,1024,4096 (--quick: 256,1024)",
    )  # fmt: skip
    parser.add_argument(
        "--densities",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.01, 0.05, 0.1, 0.3, 1.0],
    )
    parser.add_argument("--reps", type=int, default=21, help="timed repetitions (>= 20)")
    parser.add_argument(
        "--diagnostic", action="store_true",
        help="add the row {mlp,cnn}:ssvi-lr1e-3; writes ssvi_quality_diagnostic.md",
    )  # fmt: skip
    args = parser.parse_args()
    threads = C.one_thread()
    print(threads, flush=True)
    # the CSR constructor warns (beta state, invariant checks) on first use
    warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
    suffix = "_quick" if args.quick else ""
    if args.part in ("all", "quality"):
        if not BAYESIAN_TORCH:
            print(BAYESIAN_TORCH_ABSENT, flush=True)
        text = run_quality(args, threads)
        print("\n" + text)
        name = f"ssvi_quality{'_diagnostic' * args.diagnostic}{suffix}.md"
        print(f"\nwritten to {C.write_out(name, text + chr(10))}")
    if args.part in ("all", "walltime"):
        text = run_walltime(args, threads)
        print("\n" + text)
        print(f"\nwritten to {C.write_out(f'ssvi_walltime{suffix}.md', text + chr(10))}")


if __name__ == "__main__":
    main()

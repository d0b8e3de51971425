"""Shared pieces of the VBLL benchmarks: data, network, training loops, metrics and timing.

Protocol (the one every Bayesian-deep-learning benchmark here follows): 80/20 split with seed 0
(stratified for classification), inputs standardised with training statistics, regression
targets standardised too (RMSE and NLL in target standard deviations); a 2x128 ReLU MLP; Adam
lr 1e-3 with weight decay 1e-4 on the body and on a plain head, 0 on Bayesian heads; digits
batch 64 / 40 epochs, diabetes batch 32 / 30 epochs; one thread.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_*.py` from a fresh clone
    sys.path.insert(0, str(ROOT))

from bdl import metrics  # noqa: E402
from bdl.lastlayer import (  # noqa: E402
    GenerativeVBLLClassification,
    HeteroscedasticVBLLRegression,
    VBLLClassification,
    VBLLRegression,
)
from bdl.nets import make_mlp  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
HIDDEN = (128, 128)
LR = 1e-3
WEIGHT_DECAY = 1e-4
CLIP = 1.0
# (batch size, epochs) of the protocol
PROTOCOL = {"digits": (64, 40), "diabetes": (32, 30)}


def one_thread() -> str:
    """Pin torch to one thread; returns the line the scripts print about it."""
    torch.set_num_threads(1)
    return (
        f"torch {torch.__version__}, torch.set_num_threads(1) "
        f"(torch.get_num_threads() = {torch.get_num_threads()})"
    )


# ----------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Standardised train/test arrays (float32 inputs; long labels or float32 (n, 1) targets)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classification: bool

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(
            torch.as_tensor(a) for a in (self.x_train, self.y_train, self.x_test, self.y_test)
        )  # type: ignore[return-value]


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)  # constant digits pixels keep scale 1
    return ((train - mean) / sd).astype(np.float32), ((test - mean) / sd).astype(np.float32)


def load_split(name: str, keep_train_classes: Sequence[int] | None = None) -> Split:
    """The protocol split of ``digits`` or ``diabetes``.

    ``keep_train_classes`` drops the other classes from the training set only (after the
    split, before standardising), for the out-of-distribution experiment.
    """
    if name == "digits":
        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
        if keep_train_classes is not None:
            keep = np.isin(ytr, keep_train_classes)
            xtr, ytr = xtr[keep], ytr[keep]
        xtr, xte = _standardise(xtr, xte)
        return Split(name, xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), True)
    if name == "diabetes":
        x, y = load_diabetes(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0)
        xtr, xte = _standardise(xtr, xte)
        ytr, yte = _standardise(ytr[:, None], yte[:, None])
        return Split(name, xtr, ytr, xte, yte, False)
    raise ValueError(f"unknown dataset {name!r}")


# -------------------------------------------------------------------------------- network


class Net(nn.Module):
    """Feature extractor ``body`` followed by ``head`` (an ``nn.Linear`` or a Bayesian head)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def make_body(in_features: int) -> nn.Sequential:
    """The protocol's 2x128 ReLU MLP (ends in its last hidden activation)."""
    return make_mlp(in_features, HIDDEN)


def make_optimizer(net: Net, head_decay: float, adamw: bool = False) -> torch.optim.Optimizer:
    """Adam (or AdamW) lr 1e-3: weight decay 1e-4 on the body, ``head_decay`` on the head."""
    groups = [
        {"params": list(net.body.parameters()), "weight_decay": WEIGHT_DECAY},
        {"params": list(net.head.parameters()), "weight_decay": head_decay},
    ]
    return (torch.optim.AdamW if adamw else torch.optim.Adam)(groups, lr=LR)


# ------------------------------------------------------------------------ head factories
# Each factory maps (feature width, outputs or classes, num_data) to (head, loss(phi, y)).

LossFn = Callable[[Tensor, Tensor], Tensor]
HeadFactory = Callable[[int, int, int], tuple[nn.Module, LossFn]]


def plain_classification(d: int, c: int, n: int) -> tuple[nn.Module, LossFn]:
    head = nn.Linear(d, c)
    return head, lambda phi, y: nn.functional.cross_entropy(head(phi), y)


def plain_regression(d: int, m: int, n: int) -> tuple[nn.Module, LossFn]:
    head = nn.Linear(d, m)
    return head, lambda phi, y: nn.functional.mse_loss(head(phi), y)


def ours(cls: type, **kwargs) -> HeadFactory:
    """One of our heads, ``cls(d, k, num_data=n, **kwargs)``, trained on ``head.loss``."""

    def factory(d: int, k: int, n: int) -> tuple[nn.Module, LossFn]:
        head = cls(d, k, num_data=n, **kwargs)
        return head, head.loss

    return factory


def vbll_package(kind: str, **kwargs) -> HeadFactory:
    """The vbll package's ``Regression`` / ``DiscClassification`` with weight 1/N, trained as
    its README does: ``layer(phi).train_loss_fn(y)`` (the forward also builds the predictive)."""
    import vbll

    cls = {"regression": vbll.Regression, "classification": vbll.DiscClassification}[kind]

    def factory(d: int, k: int, n: int) -> tuple[nn.Module, LossFn]:
        head = cls(d, k, 1.0 / n, **kwargs)
        return head, lambda phi, y: head(phi).train_loss_fn(y)

    return factory


OUR_CLASSIFICATION: dict[str, HeadFactory] = {
    "dense": ours(VBLLClassification, covariance="dense"),
    "diagonal": ours(VBLLClassification, covariance="diagonal"),
    "lowrank": ours(VBLLClassification, covariance="lowrank"),
    "generative": ours(GenerativeVBLLClassification),
}
OUR_REGRESSION: dict[str, HeadFactory] = {
    "dense": ours(VBLLRegression, covariance="dense"),
    "diagonal": ours(VBLLRegression, covariance="diagonal"),
    "lowrank": ours(VBLLRegression, covariance="lowrank"),
    "heteroscedastic": ours(HeteroscedasticVBLLRegression),
}


# ------------------------------------------------------------------------------- training


def train(
    split: Split,
    factory: HeadFactory,
    seed: int,
    *,
    head_decay: float,
    clip: float | None,
    adamw: bool = False,
    epochs: int | None = None,
) -> Net:
    """Minibatch training of ``make_body + factory`` on the protocol batch size and epochs.

    The seed sets the initialisation (``torch.manual_seed``) and the minibatch order.
    """
    batch, default_epochs = PROTOCOL[split.name]
    epochs = default_epochs if epochs is None else epochs
    x, y, _, _ = split.tensors()
    n, k = x.shape[0], split.num_classes if split.classification else y.shape[1]
    torch.manual_seed(seed)
    body = make_body(x.shape[1])
    head, loss_fn = factory(HIDDEN[-1], k, n)
    if isinstance(head, GenerativeVBLLClassification):
        head.set_class_prior(torch.bincount(y, minlength=k).float())
    net = Net(body, head)
    opt = make_optimizer(net, head_decay, adamw)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(net.body(x[idx]), y[idx]).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
    net.eval()
    return net


@torch.no_grad()
def training_residual_variance(net: Net, split: Split) -> float:
    """Mean squared training residual of a plain regression net (MAP noise variance)."""
    x, y, _, _ = split.tensors()
    return float((net(x) - y).pow(2).mean())


# ------------------------------------------------------------------------------ predictions


@torch.no_grad()
def predict_proba(net: Net, x: Tensor, seed: int = 0) -> Tensor:
    """Predictive class probabilities (n, C) of a trained net of any head kind."""
    phi = net.body(x)
    head = net.head
    if isinstance(head, nn.Linear):
        probs = torch.softmax(head(phi), -1)
    elif hasattr(head, "posterior"):  # ours
        probs = head.posterior(phi).probs
    else:  # vbll: Monte Carlo over Gaussian logits (20 draws); seed it for reproducibility
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probs = head.predictive(phi)
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def predict_gaussian(net: Net, x: Tensor, noise_variance: float | None = None):
    """Predictive mean and variance (with observation noise), each (n, 1)."""
    phi = net.body(x)
    head = net.head
    if isinstance(head, nn.Linear):
        mean = head(phi)
        return mean, torch.full_like(mean, float(noise_variance))
    if hasattr(head, "posterior"):  # ours
        post = head.posterior(phi, observation_noise=True)
        return post.mean, post.variance
    pred = head(phi).predictive  # vbll: Normal, noise included
    return pred.mean, pred.variance


def classification_metrics(probs: Tensor, y: Tensor) -> dict[str, float]:
    probs, y = probs.double(), torch.as_tensor(y)
    return {
        "acc": float(metrics.accuracy(probs, y)),
        "nll": float(metrics.categorical_nll(probs, y)),
        "ece": float(metrics.expected_calibration_error(probs, y, n_bins=15)),
        "brier": float(metrics.brier_score(probs, y)),
    }


def regression_metrics(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    mean, var, y = mean.double(), var.double(), torch.as_tensor(y).double()
    return {
        "rmse": float(metrics.rmse(mean, y)),
        "nll": float(metrics.gaussian_nll(mean, var, y)),
        "ice": float(metrics.interval_calibration_error(mean, var, y)),
    }


# --------------------------------------------------------------------------------- report


def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` (sample sd; just the mean for one value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_out(name: str, text: str) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------- timing


def interleaved_timing(
    step_a: Callable[[], None],
    step_b: Callable[[], None],
    *,
    rounds: int,
    steps: int,
    steps_b: int | None = None,
    warmup: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-step seconds of ``step_a`` and ``step_b``, one value per round and side.

    Each round times ``steps`` calls of one side, then ``steps_b`` (default ``steps``) calls of
    the other; the side that goes first alternates from round to round, so slow drifts of the
    machine hit both sides alike. ``warmup`` untimed calls of each side come first.
    """
    steps_b = steps if steps_b is None else steps_b
    for _ in range(warmup):
        step_a()
        step_b()
    a: list[float] = []
    b: list[float] = []
    sides = [(step_a, steps, a), (step_b, steps_b, b)]
    for r in range(rounds):
        for fn, n, out in sides if r % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n)
    return a, b


def seeds_for(quick: bool, n: int = 5) -> list[int]:
    return [0] if quick else list(range(n))


def selected(key: str, patterns: Sequence[str] | None) -> bool:
    """Row filter: keep ``key`` if any comma-separated pattern is a substring of it."""
    return not patterns or any(p in key for p in patterns)

"""Cost of one SG-MCMC training iteration relative to the same iteration with torch.optim.SGD.

Iteration = ``zero_grad`` + forward + cross-entropy + backward + optimizer step on a batch of
64 through the protocol's 2x128 ReLU MLP with a linear head (digits-shaped: 64 inputs, 10
classes; 26,122 parameters), one thread. Pairs (issue target: ratio <= 1.15):

- SGLD vs ``torch.optim.SGD`` without momentum,
- SGHMC (``momentum_decay`` 0.1) vs ``torch.optim.SGD(momentum=0.9)``,
- pSGLD vs ``torch.optim.RMSprop`` (its noise-free counterpart; no target),

plus a reference row "SGD + randn floor": SGD followed by one ``torch.randn`` of the model's
size, i.e. the cheapest way to draw the Gaussians a Langevin step needs (a floor no sampler
beats). Each pair is timed in interleaved rounds (the side that goes first alternates) after a
warm-up; the table gives the median µs per iteration of each side and the ratio of the medians.

Usage: ``python benchmarks/bench_sgmcmc_step.py [--quick] [--rounds 21] [--steps 300]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import _common as C
import torch
from torch import nn

from bdl.sgmcmc import PSGLD, SGHMC, SGLD

BATCH, D_IN, CLASSES = 64, 64, 10
NUM_DATA = 1437  # digits training split
NUM_BATCHES = 8
TARGET = 1.15

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def pairs() -> list[tuple[str, OptFactory, str, OptFactory, float | None]]:
    """(label, sampler factory, baseline label, baseline factory, target ratio)."""
    lr = 1e-2

    def sgd_then_randn(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = torch.optim.SGD(ps, lr=lr)
        size = sum(p.numel() for p in ps)
        step = opt.step

        def step_and_draw() -> None:
            step()
            torch.randn(size)

        opt.step = step_and_draw  # type: ignore[method-assign]
        return opt

    return [
        (
            "SGLD",
            lambda ps: SGLD(ps, lr=lr, num_data=NUM_DATA),
            "SGD",
            lambda ps: torch.optim.SGD(ps, lr=lr),
            TARGET,
        ),
        (
            "SGHMC (alpha 0.1)",
            lambda ps: SGHMC(ps, lr=lr, num_data=NUM_DATA, momentum_decay=0.1),
            "SGD momentum 0.9",
            lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            TARGET,
        ),
        (
            "pSGLD",
            lambda ps: PSGLD(ps, lr=1e-3, num_data=NUM_DATA),
            "RMSprop",
            lambda ps: torch.optim.RMSprop(ps, lr=1e-3, alpha=0.99, eps=1e-5),
            None,
        ),
        (
            "SGD + randn floor",
            sgd_then_randn,
            "SGD",
            lambda ps: torch.optim.SGD(ps, lr=lr),
            None,
        ),
    ]


def make_step(make_opt: OptFactory, seed: int = 0) -> Callable[[], None]:
    """A closure running one full training iteration."""
    torch.manual_seed(seed)
    net = nn.Sequential(C.make_body(D_IN), nn.Linear(C.HIDDEN[-1], CLASSES))
    opt = make_opt(list(net.parameters()))
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(NUM_BATCHES, BATCH, D_IN, generator=gen)
    ys = torch.randint(CLASSES, (NUM_BATCHES, BATCH), generator=gen)
    state = {"i": 0}

    def step() -> None:
        i = state["i"] = (state["i"] + 1) % NUM_BATCHES
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(xs[i]), ys[i]).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 30 steps (smoke run)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=300, help="iterations per side per round")
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    threads = C.one_thread()
    rounds, steps, warmup = (3, 30, 10) if args.quick else (args.rounds, args.steps, args.warmup)

    table = []
    for label, make_ours, base_label, make_base, target in pairs():
        t_base, t_ours = C.interleaved_timing(
            make_step(make_base), make_step(make_ours), rounds=rounds, steps=steps, warmup=warmup
        )
        med_base, med_ours = statistics.median(t_base), statistics.median(t_ours)
        ratio = med_ours / med_base
        paired = statistics.median(o / b for o, b in zip(t_ours, t_base, strict=True))
        verdict = (
            "-" if target is None else f"<= {target:g}x " + ("PASS" if ratio <= target else "MISS")
        )
        row = [
            label,
            base_label,
            f"{med_ours * 1e6:.0f}",
            f"{med_base * 1e6:.0f}",
            f"{ratio:.3f}x",
            f"{paired:.3f}x",
            verdict,
        ]
        print("  " + " | ".join(row), flush=True)
        table.append(row)

    header = [
        "sampler",
        "baseline",
        "sampler µs/iter",
        "baseline µs/iter",
        "ratio",
        "per-round",
        "target",
    ]
    note = "QUICK smoke run; " * args.quick
    text = "\n".join(
        [
            "# SG-MCMC training-iteration cost vs torch.optim",
            "",
            f"{threads}. {note}Iteration = zero_grad + forward + cross-entropy + backward + "
            f"step, batch {BATCH}, 2x128 ReLU MLP + linear head (input {D_IN}, C={CLASSES}). "
            f"Medians over {rounds} interleaved rounds of {steps} iterations per side; ratio = "
            "median sampler / median baseline; per-round = median over rounds of the ratio "
            "within a round; same run.",
            "",
            C.markdown_table(header, table),
        ]
    )
    print()
    print(text)
    name = "sgmcmc_step_quick.md" if args.quick else "sgmcmc_step.md"
    print(f"\nwritten to {C.write_out(name, text + chr(10))}")


if __name__ == "__main__":
    main()

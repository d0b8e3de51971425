"""Cost of one training iteration with a VBLL head, relative to a plain ``nn.Linear`` head.

Iteration = ``zero_grad`` + forward + loss + backward + Adam step on a batch of 64, one thread,
through the protocol's 2x128 ReLU MLP: classification (input 64, C = 10, as digits) and
regression (input 10, m = 1, as diabetes). Each head is timed against a freshly built plain
net (same body, ``nn.Linear`` head, cross-entropy / MSE) in interleaved rounds (the side that
goes first alternates), after a warm-up; the table gives the median µs per iteration of each
side and the ratio of the medians, all from the same run.

vbll is used as its README trains it: ``layer(phi).train_loss_fn(y)``; that forward also
builds the Monte Carlo predictive (20 draws) that ``train_loss_fn`` does not need.

Usage: ``python benchmarks/bench_vbll_step.py [--quick] [--rounds 15] [--steps 200]
[--rows 'regression ours'] [--profile]``.
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch

BATCH = 64
NUM_BATCHES = 8  # cycle through a few fixed batches
# task -> (input width, outputs / classes)
TASKS = {"classification": (64, 10), "regression": (10, 1)}
TARGET_DENSE_CLS, TARGET_OTHER = 3.0, 1.3


def heads() -> list[tuple[str, str, C.HeadFactory, float | None]]:
    """(task, label, factory, target ratio or None for the peer rows)."""
    out = [
        ("classification", "ours dense", C.OUR_CLASSIFICATION["dense"], TARGET_DENSE_CLS),
        ("classification", "ours diagonal", C.OUR_CLASSIFICATION["diagonal"], TARGET_OTHER),
        ("classification", "ours lowrank (rank 4)", C.OUR_CLASSIFICATION["lowrank"], TARGET_OTHER),
        ("classification", "ours generative", C.OUR_CLASSIFICATION["generative"], None),
        ("regression", "ours dense", C.OUR_REGRESSION["dense"], TARGET_OTHER),
        ("regression", "ours diagonal", C.OUR_REGRESSION["diagonal"], TARGET_OTHER),
        ("regression", "ours lowrank (rank 4)", C.OUR_REGRESSION["lowrank"], TARGET_OTHER),
        ("regression", "ours heteroscedastic", C.OUR_REGRESSION["heteroscedastic"], TARGET_OTHER),
    ]
    for param, extra in (("diagonal", {}), ("dense", {}), ("lowrank", {"cov_rank": 3})):
        factory = C.vbll_package("classification", parameterization=param, **extra)
        label = f"vbll {param}" + (" (rank 3)" if param == "lowrank" else "")
        out.append(("classification", label, factory, None))
    out.append(
        ("regression", "vbll dense", C.vbll_package("regression", parameterization="dense"), None)
    )
    return out


def make_step(task: str, factory: C.HeadFactory, seed: int):
    """A closure running one full training iteration of ``body + head``."""
    d_in, k = TASKS[task]
    torch.manual_seed(seed)
    body = C.make_body(d_in)
    head, loss_fn = factory(C.HIDDEN[-1], k, 1437 if task == "classification" else 353)
    net = C.Net(body, head)
    opt = torch.optim.Adam(net.parameters(), lr=C.LR)
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(NUM_BATCHES, BATCH, d_in, generator=gen)
    if task == "classification":
        ys = torch.randint(k, (NUM_BATCHES, BATCH), generator=gen)
    else:
        ys = torch.randn(NUM_BATCHES, BATCH, k, generator=gen)
    state = {"i": 0}

    def step() -> None:
        i = state["i"] = (state["i"] + 1) % NUM_BATCHES
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net.body(xs[i]), ys[i])
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 steps (smoke run)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200, help="iterations per side per round")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rows", default="", help="comma-separated substrings of row labels")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, print torch.profiler's top ops for each selected row",
    )
    args = parser.parse_args()
    threads = C.one_thread()
    rounds, steps, warmup = (3, 20, 5) if args.quick else (args.rounds, args.steps, args.warmup)
    patterns = [p for p in args.rows.split(",") if p]

    table = []
    for task, label, factory, target in heads():
        if not C.selected(f"{task} {label}", patterns):
            continue
        plain = C.plain_classification if task == "classification" else C.plain_regression
        if args.profile:
            profile(f"{task} {label}", make_step(task, factory, 0))
            continue
        step_plain, step_head = make_step(task, plain, 0), make_step(task, factory, 0)
        # slow heads (vbll dense) get fewer iterations per round: about 2 s a round at most
        probe = C.interleaved_timing(step_plain, step_head, rounds=1, steps=3, warmup=2)[1][0]
        head_steps = max(5, min(steps, int(2.0 / probe)))
        t_plain, t_head = C.interleaved_timing(
            step_plain,
            step_head,
            rounds=rounds,
            steps=steps,
            steps_b=head_steps,
            warmup=min(warmup, head_steps),
        )
        med_plain, med_head = statistics.median(t_plain), statistics.median(t_head)
        ratio = med_head / med_plain
        paired = statistics.median(h / p for h, p in zip(t_head, t_plain, strict=True))
        verdict = "" if target is None else ("PASS" if ratio <= target else "MISS")
        row = [
            task,
            label,
            f"{med_plain * 1e6:.0f}",
            f"{med_head * 1e6:.0f}",
            f"{ratio:.2f}x",
            f"{paired:.2f}x",
            "-" if target is None else f"<= {target:g}x {verdict}",
        ]
        print("  " + " | ".join(row), flush=True)
        table.append(row)

    if args.profile:
        return
    header = ["task", "head", "plain µs/iter", "head µs/iter", "ratio", "per-round", "target"]
    note = "QUICK smoke run; " * args.quick
    text = "\n".join(
        [
            "# VBLL training-iteration cost vs a plain nn.Linear head",
            "",
            f"{threads}. {note}Iteration = zero_grad + forward + loss + backward + Adam step, "
            f"batch {BATCH}, 2x128 ReLU MLP (classification: input 64, C=10; regression: input "
            f"10, m=1). Medians over {rounds} interleaved rounds of up to {steps} iterations per "
            "side (fewer for slow heads); ratio = median head / median plain (targets apply to "
            "it); per-round = median over rounds of the ratio within a round; same run.",
            "",
            C.markdown_table(header, table),
            "",
            "Peer reference (the vbll package): diagonal 4.2x, low-rank 9x, dense 105x.",
        ]
    )
    print()
    print(text)
    name = "vbll_step_quick.md" if args.quick else "vbll_step.md"
    print(f"\nwritten to {C.write_out(name, text + chr(10))}")


def profile(label: str, step, iters: int = 100) -> None:
    """Self CPU time per op over ``iters`` iterations (after a warm-up), top 15."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(20):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    print(f"\n### {label} ({iters} iterations)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

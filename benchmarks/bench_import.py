"""Import cost of ``bdl`` and ``gp`` against ``torch`` + ``gpytorch``, by ``python -X importtime``.

Each statement runs in a fresh interpreter; its cost is the sum of the cumulative
``-X importtime`` times of the top-level imports it triggers (microseconds, as Python prints
them). The statements alternate, each is repeated ``--repeats`` times, and the script prints
medians and the ratio to ``import torch, gpytorch`` measured in the same run. The package
imports are lazy, so ``import bdl, gp`` alone is cheap; the rows below it show what the first
use of each family costs.

Run: ``python benchmarks/bench_import.py [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASELINE = "import torch, gpytorch"
STATEMENTS = [
    BASELINE,
    "import bdl, gp",
    "import bdl.core",
    "from gp import ExactGP",
    "from gp import StateSpaceGP",
    "from gp import SVGP",
    "from bdl.lastlayer import VBLLRegression",
    "from bdl.sgmcmc import SGHMC",
    "from bdl import VBLLRegressor",
    "from gp import GPRegressor",
]


def import_time_us(statement: str) -> int:
    """Total cumulative import time (us) of the top-level imports ``statement`` triggers."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if name[1:2] != " ":  # nesting shows as extra leading spaces: this is a top-level one
            total += int(cumulative)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[int]] = {s: [] for s in STATEMENTS}
    for _ in range(args.repeats):
        for statement in STATEMENTS:  # alternate the statements within each repeat
            times[statement].append(import_time_us(statement))
    base = statistics.median(times[BASELINE])
    print(f"python {sys.version.split()[0]}, {args.repeats} repeats, medians of -X importtime")
    print(f"{'statement':45s} {'ms':>8s} {'ratio':>7s}")
    for statement in STATEMENTS:
        median = statistics.median(times[statement])
        print(f"{statement:45s} {median / 1000:8.1f} {median / base:7.2f}")


if __name__ == "__main__":
    main()

"""Shared plumbing for the examples: smoke mode, output folder, matplotlib backend."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

SMOKE_ENV = "BDL_SMOKE"


def smoke_mode() -> bool:
    """True when the ``BDL_SMOKE`` environment variable asks for tiny sizes (used by tests)."""
    return os.environ.get(SMOKE_ENV, "0") not in ("", "0", "false", "False")


def output_dir(description: str) -> Path:
    """Parse ``--out DIR`` (default ``out/``), create it and return it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="out", help="folder the plot is written into")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out

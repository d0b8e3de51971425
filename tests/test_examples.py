"""Smoke tests: every example script runs end to end in smoke mode and writes a plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_examples_found():
    expected = {"quickstart.py", "vbll_regression.py", "vbll_digits.py"}
    expected |= {"sgmcmc_digits.py", "sgmcmc_regression.py"}
    expected |= {"statespace_co2.py", "statespace_sunspots.py"}
    assert expected <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_in_smoke_mode(script: Path, tmp_path: Path):
    env = {**os.environ, "BDL_SMOKE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    if result.stdout.startswith("skipped:"):  # an optional extra is absent
        pytest.skip(result.stdout.strip())
    pngs = list(tmp_path.glob("*.png"))
    assert pngs, f"{script.name} wrote no .png into --out:\n{result.stdout}"
    assert all(p.stat().st_size > 0 for p in pngs)

"""``benchmarks/gpu_check.py``: a clean exit without CUDA, and its GPU path run on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_cleanly(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_the_gpu_path_runs_on_the_cpu(gpu_check, capsys):
    """A dry run (``--device cpu``) of the device checks of a head (every check), a sample
    collector (moved by ``_apply``) and an estimator, and of one timing row."""
    cases = "vbll_regression_dense,SampleCollector-regression,SGMCMCRegressor"
    code = gpu_check.main(["--device", "cpu", "--quick", "-k", cases, "-t", "VBLL network"])
    out = capsys.readouterr().out
    assert code == 0, out
    for check in ("posterior", "grad", "state_dict", "joint", "noise", "fit"):
        assert f"| model vbll_regression_dense | {check} | ok" in out
    assert "| model SampleCollector-regression | posterior | ok" in out
    assert "| estimator SGMCMCRegressor | fit_predict | ok |" in out
    assert "| VBLL network training step |" in out and " ms |" in out


def test_a_failing_check_is_a_table_row_not_an_exception(gpu_check, capsys):
    class Broken:
        name, d, joint, noise, fit = "broken", 3, False, None, None

        def build(self, dtype):
            raise RuntimeError("cannot build")

    rows = gpu_check.run_checks(
        "model broken", gpu_check.model_checks(Broken(), torch.device("cpu"))
    )
    assert [check for _, check, _ in rows] == ["posterior", "grad", "state_dict"]
    assert [status for *_, status in rows[:2]] == ["FAIL: RuntimeError: cannot build"] * 2
    assert "| model broken | grad | FAIL: RuntimeError: cannot build |" in capsys.readouterr().out

"""benchmarks/loss_curve.py on the CPU: two tiny fp32 training runs (compiled CPU scan vs chunked) agree."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from mambabyte.ops import dispatch


@pytest.fixture(scope="module")
def loss_curve():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_curve.py"
    spec = importlib.util.spec_from_file_location("loss_curve_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_runs_agree_and_write_json_and_plot(loss_curve, tmp_path, capsys):
    scan_before, triton_before = os.environ.get("MAMBABYTE_SCAN"), dispatch.TRITON_RUNS
    result = loss_curve.main(["--preset", "tiny", "--batch", "2", "--length", "128", "--steps", "20",
                              "--device", "cpu", "--out", str(tmp_path)])
    fast, reference = result["fast"]["losses"], result["reference"]["losses"]
    assert len(fast) == len(reference) == 20
    assert all(math.isfinite(loss) for loss in fast + reference)
    assert fast[-1] < fast[0] - 0.1  # it trains
    assert result["reference"]["scan_backend"] == "chunked" and not result["reference"]["triton_conv"]
    assert max(abs(f - r) for f, r in zip(fast, reference)) < 1e-4  # both fp32: rounding only
    assert result["summary"]["max_abs_difference"] < 1e-4 and result["summary"]["tail_steps"] == 20
    saved = json.loads((tmp_path / "loss_curve.json").read_text())
    assert saved["fast"]["losses"] == fast and saved["reference"]["losses"] == reference
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert "| final loss (step 20) |" in capsys.readouterr().out
    assert (os.environ.get("MAMBABYTE_SCAN"), dispatch.TRITON_RUNS) == (scan_before, triton_before)  # restored


def test_compare_finds_the_largest_difference(loss_curve):
    summary = loss_curve.compare([2.0, 1.5, 1.0], [2.0, 1.0, 1.1])
    assert summary["first_step_abs_difference"] == 0.0
    assert summary["max_abs_difference"] == pytest.approx(0.5) and summary["max_abs_difference_step"] == 2
    assert summary["final_relative_difference"] == pytest.approx(0.1 / 1.1)
    assert summary["tail_mean_abs_difference"] == pytest.approx(0.6 / 3)

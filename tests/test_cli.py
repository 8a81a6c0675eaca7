"""The `mambabyte` command: as a user runs it (a subprocess), and in-process for the rest (faster)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mambabyte.checkpoint import save_pretrained
from mambabyte.cli import main

# the console script installed beside this Python, else the module
SCRIPT = shutil.which("mambabyte", path=str(Path(sys.executable).parent))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "mambabyte.cli"]


def mambabyte(*args):
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("mambabyte ")


def test_help_lists_commands():
    result = mambabyte("--help")
    assert result.returncode == 0, result.stderr
    for command in ("info", "export-hf", "import-hf"):
        assert command in result.stdout


def test_info_tiny():
    result = mambabyte("info", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "FLOPs/byte" in result.stdout


def test_info_json():
    result = mambabyte("info", "--preset", "small", "--json", "--batch", "4")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["parameters"] == 3_569_920
    assert summary["config"]["d_model"] == 256 and summary["batch"] == 4
    assert summary["state_bytes_total"] == 8 * summary["state_bytes_per_layer"] > 0
    assert summary["flops_per_byte_train"] == 3 * summary["flops_per_byte_forward"] > 0


def test_unknown_preset_is_one_line_error():
    result = mambabyte("info", "--preset", "no-such-preset")
    assert_one_line_error(result)
    assert "no-such-preset" in result.stderr


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert main(["info", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_info_reads_a_checkpoint(tiny_model, tmp_path, capsys):
    save_pretrained(tiny_model, tmp_path / "ckpt")
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == tiny_model.num_parameters()


def test_bad_batch_is_one_line_error(capsys):
    assert main(["info", "--batch", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exited:
        main(["no-such-command"])
    assert exited.value.code == 2


def test_info_for_every_architecture():
    import json
    import subprocess
    import sys

    counts = {}
    for arch in ("mambabyte", "transformer", "megabyte"):
        done = subprocess.run([sys.executable, "-m", "mambabyte.cli", "info", "--preset", "small", "--arch", arch, "--json"],
                              capture_output=True, text=True, check=True)
        summary = json.loads(done.stdout)
        assert summary["arch"] == arch and summary["flops_per_byte_train"] == 3 * summary["flops_per_byte_forward"]
        counts[arch] = summary["parameters"]
    assert all(abs(n / counts["mambabyte"] - 1) < 0.15 for n in counts.values())  # presets matched in size

"""benchmarks/kernel_resources.py: our Triton kernels compiled for sm_90 on a machine without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="this Triton build ships no NVIDIA tools")
def test_reports_registers_and_instructions_of_a_kernel_compiled_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--only", "decode scan"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| decode scan |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    registers, local_bytes, instructions = int(cells[2]), int(cells[3]), int(cells[4])
    assert 16 <= registers <= 255 and instructions > 100 and local_bytes >= 0

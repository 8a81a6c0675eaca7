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
def test_reports_registers_and_instructions_of_the_decode_kernels_compiled_for_hopper():
    """All four decode kernels as they run on Hopper (programmatic dependent launch, the inline-PTX L2 prefetch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--only", "decode"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| decode ")]
    names = [row.strip("|").split("|")[0].strip() for row in rows]
    assert [name.split(",")[0] for name in names] == ["decode norm + in_proj", "decode conv + x_proj",
                                                      "decode conv + x_proj", "decode scan",
                                                      "decode out_proj + residual"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        registers, local_bytes, instructions = int(cells[2]), int(cells[3]), int(cells[4])
        assert 16 <= registers <= 255 and instructions > 100 and local_bytes >= 0

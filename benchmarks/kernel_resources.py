"""What the compiler makes of our Triton kernels, without a GPU: registers per thread, local-memory spills and
the instruction mix of each kernel compiled for an NVIDIA target (default sm_90, the H100).

Triton compiles for a GPU it does not have (its NVIDIA backend ships ptxas and cuobjdump); the figures are the
compiler's, not timings, and a device's Triton may compile somewhat differently. Registers bound how many
programs an SM keeps in flight: at 255 registers a one-warp program leaves 8 warps per SM.

    python benchmarks/kernel_resources.py                  # every kernel variant below
    python benchmarks/kernel_resources.py --only scan      # names containing "scan"
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from mambabyte.ops import triton_decode, triton_scan

SCAN_POINTERS = {name: "*bf16" for name in ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr",
                                             "dx_ptr", "ddt_ptr", "dz_ptr", "chunk_states_ptr")} | {"reset_ptr": "*i8"}
SCAN = dict(HAS_Z=True, HAS_RESET=False, BLOCK_T=16, BLOCK_N=16)  # as benchmarks/gpu.py trains: no document resets
DECODE_POINTERS = {name: "*bf16" for name in ("w_ptr", "norm_ptr", "y_ptr", "wx_ptr", "wdt_ptr", "conv_w_ptr",
                                               "conv_b_ptr", "conv_state_ptr", "conv_out_ptr")}
# (name, kernel, constexprs, warps[, pointer types]): bf16 training tiles for the scan, bench-91m decoding tiles
VARIANTS = [
    *[(f"scan forward, BLOCK_D {d}", triton_scan._scan_fwd_kernel,
       dict(SCAN, BLOCK_D=d, HAS_H0=True, SAVE_STATES=True, CARRY_PASS=False), 1) for d in (32, 16)],
    ("scan forward, BLOCK_D 32, fp32 saved states", triton_scan._scan_fwd_kernel,
     dict(SCAN, BLOCK_D=32, HAS_H0=True, SAVE_STATES=True, CARRY_PASS=False), 1, {"chunk_states_ptr": "*fp32"}),
    *[(f"scan backward, BLOCK_D {d}", triton_scan._scan_bwd_kernel, dict(SCAN, BLOCK_D=d), 1) for d in (32, 16)],
    ("scan segment carry, 128 segments", triton_scan._segment_carry_kernel,
     dict(HAS_FIRST=True, REVERSE=False, BLOCK_S=128, BLOCK_E=32), 4),
    ("decode norm + in_proj", triton_decode._norm_linear_kernel,
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, PRECISION="tf32", USE_PDL=True, PREFETCH=True, LINES=16,
          LINE_ELEMENTS=64), 4),
    *[(f"decode conv + x_proj, BLOCK_K {block_k}", triton_decode._conv_x_proj_kernel,
       dict(KCONV=4, KEEP_STATES=False, BLOCK_M=16, BLOCK_K=block_k, BLOCK_R=128, PRECISION="tf32", USE_PDL=True,
            EARLY_LAUNCH=False, PREFETCH=True, LINES=block_k // 64, LINE_ELEMENTS=64), warps) for block_k, warps in ((128, 4), (64, 8))],
    ("decode scan", triton_decode._scan_kernel,
     dict(KEEP_STATES=False, BLOCK_D=16, BLOCK_R=64, BLOCK_N=16, USE_PDL=True, EARLY_LAUNCH=False), 4),
    ("decode out_proj + residual", triton_decode._out_proj_kernel,
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, PRECISION="tf32", USE_PDL=True, EARLY_LAUNCH=False, PREFETCH=True,
          LINES=32, LINE_ELEMENTS=64), 4),
]
COUNTED = ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "LDG", "STG", "REDG", "LDS", "STS", "BAR")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def signature(kernel, constexprs: dict, pointers: dict) -> dict:
    """Argument types: constexprs as given, pointers fp32 unless named in ``pointers``, eps fp32, the rest i32."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers.get(name, "*fp32")
        else:
            types[name] = "fp32" if name == "eps" else "i32"
    return types


def resources(cubin: bytes) -> dict:
    """Registers, local memory (spills) and counted instructions of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", file.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    ops = collections.Counter()
    for instruction in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]+);", sass):
        words = [word for word in instruction.split() if not word.startswith("@")]
        ops[words[0].split(".")[0]] += 1
    return dict(registers=int(fields["REG"]), local_bytes=int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
                instructions=sum(ops.values()), **{op: ops[op] for op in COUNTED})


def compile_variant(kernel, constexprs: dict, warps: int, arch: int, pointer_types: dict | None = None) -> dict:
    scan = kernel in (triton_scan._scan_fwd_kernel, triton_scan._scan_bwd_kernel)
    pointers = {**(SCAN_POINTERS if scan else DECODE_POINTERS), **(pointer_types or {})}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, constexprs, pointers),
                                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    return resources(compiled.asm["cubin"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--only", default="", help="only the variants whose name contains this")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}; static instruction counts (not executed counts)\n")
    print("| kernel | warps | registers | local bytes | instructions | " + " | ".join(COUNTED) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(COUNTED))
    for name, kernel, constexprs, warps, *pointer_types in VARIANTS:
        if args.only not in name:
            continue
        found = compile_variant(kernel, constexprs, warps, args.arch, *pointer_types)
        counts = " | ".join(str(found[op]) for op in COUNTED)
        print(f"| {name} | {warps} | {found['registers']} | {found['local_bytes']} | {found['instructions']} | "
              f"{counts} |", flush=True)


if __name__ == "__main__":
    main()

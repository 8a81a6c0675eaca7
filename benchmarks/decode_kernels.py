"""Tunes and profiles the fused decoding kernels (ops.triton_decode) at ``bench-91m`` in bf16 on one GPU.

For batch 1 and 64: the time of one ``model.step`` replayed from a CUDA graph, beside the HBM limit (every
weight and state byte read once per step), a one-parameter-at-a-time sweep of the kernel tiles (keeping
the best), and the device time of each kernel of one block; then the kernels of an 8K-byte prefill.

    PYTHONPATH=src python3 benchmarks/decode_kernels.py
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._pytree import tree_leaves

from gpu import decode_rate  # benchmarks/gpu.py, beside this script

from mambabyte.architectures import build_model, presets_for
from mambabyte.ops import triton_decode

# one parameter at a time, in this order (the best value kept); programmatic dependent launch (Hopper) first,
# as the best tiles may depend on it
SWEEP = dict(pdl=[True], in_block_k=[64, 256], in_block_n=[16, 64], out_block_k=[256, 1024], out_block_n=[16, 64],
             conv_warps=[8], conv_block_k=[64, 256], conv_splits=[16, 32], scan_programs_per_sm=[1, 2, 8],
             warps=[2, 8])
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet


def step_microseconds(model, batch: int, steps: int = 300) -> float:
    return 1e6 * batch / decode_rate(model, batch, steps)


def hbm_limit_microseconds(model, batch: int) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for t in tree_leaves(model.init_state(batch)))
    return (weights + 2 * state) / HBM_BYTES_PER_S * 1e6  # the state is read and written


def sweep(model, batch: int) -> None:
    best = step_microseconds(model, batch)
    pdl = "available" if triton_decode._pdl_supported(torch.device("cuda")) else "NOT available (pdl=True is a no-op)"
    print(f"\nbatch {batch}: start {triton_decode.CONFIG} -> {best:.1f} us/step; programmatic dependent launch {pdl}")
    for name, values in SWEEP.items():
        kept = triton_decode.CONFIG[name]
        for value in values:
            if value == kept:
                continue
            triton_decode.CONFIG[name] = value
            try:
                took = step_microseconds(model, batch)
            except Exception as error:  # a tile that does not compile or fit: skip it
                print(f"  {name}={value}: failed ({str(error).splitlines()[0][:80]})")
                continue
            print(f"  {name}={value}: {took:.1f} us")
            if took < best:
                best, kept = took, value
        triton_decode.CONFIG[name] = kept
    print(f"batch {batch}: best {triton_decode.CONFIG} -> {best:.1f} us/step")


def kernel_table(model, batch: int) -> None:
    block = model.layers[0]
    hidden = torch.randn(batch, 1, model.config.d_model, device="cuda")
    state = block.mixer.init_state(batch, "cuda", torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(50):
            block._span_triton(hidden, state, keep_states=False)
        torch.cuda.synchronize()
    print(f"\nkernels of one block step, batch {batch} (50 calls)")
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))


def prefill_table(model, length: int = 8192) -> None:
    ids = torch.randint(0, 256, (1, length), device="cuda")
    model(ids, return_state=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        model(ids, return_state=True)
        torch.cuda.synchronize()
    print(f"\nkernels of one prefill of {length} bytes, batch 1")
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[8192],
                        help="prompt lengths to profile (1025: a 1K prompt plus the separator, as generate reads it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(presets_for("mambabyte")["bench-91m"]).to("cuda", torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()}")
    with torch.no_grad():
        for batch in args.batches:
            if not args.no_sweep:
                sweep(model, batch)
            took = step_microseconds(model, batch)
            limit = hbm_limit_microseconds(model, batch)
            print(f"\n| batch {batch} | {took:.1f} us/step | {batch / took * 1e6:,.0f} bytes/s | "
                  f"HBM limit {limit:.1f} us/step ({batch / limit * 1e6:,.0f} bytes/s) |")
            kernel_table(model, batch)
        for length in args.prefill_lengths:
            prefill_table(model, length)


if __name__ == "__main__":
    main()

"""Tunes and profiles the fused decoding kernels (ops.triton_decode) at ``bench-91m`` in bf16 on one GPU.

For batch 1 and 64: the time of one ``model.step`` replayed from a CUDA graph, beside the HBM limit (every
weight and state byte read once per step), a one-parameter-at-a-time sweep of the kernel tiles (keeping
the best), and the device time of each kernel of one block; then the median time and profile (host and device)
of reading 1K- and 8K-byte prompts through ``Decoder.start`` (eagerly and from prompt graphs).

    PYTHONPATH=src python3 benchmarks/decode_kernels.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._pytree import tree_leaves

from gpu import decode_rate, median_ms  # benchmarks/gpu.py, beside this script

from mambabyte import cuda_graphs
from mambabyte.architectures import build_model, presets_for
from mambabyte.generate import Decoder, Sampling
from mambabyte.ops import triton_decode
from mambabyte.ops.causal_conv import causal_conv1d
from mambabyte.ops.dispatch import selective_scan

# one parameter at a time, in this order, the best value kept. SHARED tiles may set a row's arithmetic (the
# reduction order), so they are the same at every batch (a verification span must give the bits of single
# steps): scored by the summed relative time over all batches. PER_ROWS tiles (output widths, L2 prefetches,
# when the next kernel may launch) do not change a row's bits, so batch 1 keeps its own (CONFIG) and larger
# batches theirs (MANY_ROWS). Programmatic dependent launch first, as the best tiles may depend on it.
SHARED = dict(pdl=[True, False], in_block_k=[64, 128, 256], out_block_k=[256, 512, 1024],
              conv_block_k=[32, 64, 128, 256], conv_splits=[16, 24, 32, 48], warps=[2, 4, 8], conv_warps=[None, 8],
              scan_programs_per_sm=[1, 2, 4, 8])
PER_ROWS = dict(in_block_n=[16, 32, 64], out_block_n=[16, 32, 64], prefetch=[True, False],
                early_launch=[False, True])
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet


def step_microseconds(model, batch: int, steps: int = 300) -> float:
    return 1e6 * batch / decode_rate(model, batch, steps)


def hbm_limit_microseconds(model, batch: int) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for t in tree_leaves(model.init_state(batch)))
    return (weights + 2 * state) / HBM_BYTES_PER_S * 1e6  # the state is read and written


def tiles(batch: int) -> dict:
    """The dict of PER_ROWS tiles a decoding step at this batch reads (one row per sequence)."""
    return triton_decode.CONFIG if batch <= triton_decode.BLOCK_M else triton_decode.MANY_ROWS


def timed(model, batches: list[int]) -> list[float]:
    """us/step at each batch under the current tiles (inf where a tile does not compile or fit)."""
    try:
        return [step_microseconds(model, batch) for batch in batches]
    except Exception as error:  # a tile that does not compile or fit
        print(f"    failed: {str(error).splitlines()[0][:80]}")
        return [float("inf")] * len(batches)


def sweep_one(model, table: dict, name: str, values: list, batches: list[int]) -> None:
    """Try each value of one tile (in ``table``), keep the one with the least summed time relative to the first."""
    kept = table.get(name, triton_decode.CONFIG[name])
    base = timed(model, batches)
    best, best_score = kept, float(len(batches))
    print(f"  {name}={kept}: " + ", ".join(f"{t:.1f}" for t in base) + " us/step")
    for value in values:
        if value == kept:
            continue
        table[name] = value
        took = timed(model, batches)
        score = sum(t / b for t, b in zip(took, base))
        print(f"  {name}={value}: " + ", ".join(f"{t:.1f}" for t in took)
              + f" us/step (relative {score / len(batches):.3f})")
        if score < best_score:
            best, best_score = value, score
    table[name] = best


def sweep(model, batches: list[int], only: list[str] | None) -> None:
    pdl = "available" if triton_decode._pdl_supported(torch.device("cuda")) else "NOT available (pdl=True is a no-op)"
    print(f"\nprogrammatic dependent launch {pdl}; start: CONFIG {triton_decode.CONFIG}, "
          f"MANY_ROWS {triton_decode.MANY_ROWS}")
    print(f"shared tiles, us/step at batches {batches}:")
    for name, values in SHARED.items():
        if only is None or name in only:
            sweep_one(model, triton_decode.CONFIG, name, values, batches)
    for batch in batches:
        print(f"tiles of batch {batch}:")
        for name, values in PER_ROWS.items():
            if only is None or name in only:
                sweep_one(model, tiles(batch), name, values, [batch])
    print(f"best: CONFIG {triton_decode.CONFIG}, MANY_ROWS {triton_decode.MANY_ROWS}")


def kernel_table(model, batch: int, span: int = 1) -> None:
    """Device time of each kernel of one block reading ``span`` bytes per row (a span > 1 keeps the state after
    every byte, as speculative decoding's verification does)."""
    block = model.layers[0]
    hidden = torch.randn(batch, span, model.config.d_model, device="cuda")
    state = block.mixer.init_state(batch, "cuda", torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(50):
            block._span_triton(hidden, state, keep_states=span > 1)
        torch.cuda.synchronize()
    what = "step" if span == 1 else f"verification span of {span} bytes"
    print(f"\nkernels of one block {what}, batch {batch} (50 calls)")
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))


def prefill_table(model, length: int) -> None:
    """The user's path (``Decoder.start``) over a prompt of ``length`` bytes: median time per call, eagerly and
    from prompt graphs (``cuda_graphs.GRAPH_PROMPTS``), then the eager call's profile by host time (where a
    short prompt's time goes) and the graph's by device time."""
    prompt = bytes(torch.randint(32, 127, (length - 1,)).tolist())  # start adds the 1-byte separator
    start = lambda: Decoder(model, Sampling(), [0]).start([prompt])  # noqa: E731
    chosen = cuda_graphs.GRAPH_PROMPTS
    for graphs in (False, True):
        cuda_graphs.GRAPH_PROMPTS = graphs
        start()  # compiles, or captures the bucket's graph
        took = median_ms(start, 5)
        way = "eager" if not graphs else ("prompt graphs" if cuda_graphs.bucket(length) <= cuda_graphs.MAX_BUCKET
                                          else "eager (above MAX_BUCKET)")
        print(f"\nprefill of {length} bytes through Decoder.start, batch 1, {way}: median {took:.1f} ms "
              f"({length / took * 1e3:,.0f} bytes/s)")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for graphs, key in ((False, "cpu_time_total"), (True, "cuda_time_total")):  # the eager host, the graph's device
        cuda_graphs.GRAPH_PROMPTS = graphs
        with torch.profiler.profile(activities=activities) as profile:
            start()
            torch.cuda.synchronize()
        print(f"\n{'prompt graphs' if graphs else 'eager'}, by {key}:")
        print(profile.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=50))
    cuda_graphs.GRAPH_PROMPTS = chosen


def host_microseconds(call, repeats: int = 30) -> float:
    """Host time per call of ``call`` enqueued back to back (the device queue does not fill: small inputs)."""
    call()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        call()
    seconds = time.perf_counter() - begin
    torch.cuda.synchronize()
    return 1e6 * seconds / repeats


def launch_overhead(model) -> None:
    """Host time of a forward and of its pieces on 16 bytes (a prompt's read is host-bound when it is short)."""
    d_inner, d_state = model.config.d_inner, model.config.d_state
    ids = torch.randint(0, 256, (1, 16), device="cuda")
    x, dt, z = (torch.randn(1, 16, d_inner, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    B, C = (torch.randn(1, 16, d_state, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    A, D = -torch.rand(d_inner, d_state, device="cuda"), torch.ones(d_inner, device="cuda")
    bias = torch.zeros(d_inner, device="cuda")
    conv_w = torch.randn(d_inner, 1, 4, device="cuda", dtype=torch.bfloat16)
    rows = [(f"model forward, 16 bytes ({model.config.n_layer} layers)", lambda: model(ids, return_state=True)),
            ("selective_scan (triton), 16 positions", lambda: selective_scan(x, dt, A, B, C, D, bias, z=z)),
            ("causal_conv1d (triton), 16 positions", lambda: causal_conv1d(x, conv_w, conv_w[:, 0, 0])),
            ("torch add (one kernel)", lambda: x + 1)]
    print("\n| host time per call | us |\n|---|---:|")
    for name, call in rows:
        print(f"| {name} | {host_microseconds(call):,.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-only", nargs="+", choices=[*SHARED, *PER_ROWS], metavar="TILE",
                        help="sweep only these tiles (default: all of SHARED and PER_ROWS)")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[1024, 8192],
                        help="context lengths (the prompt and its 1-byte separator) to time and profile")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(presets_for("mambabyte")["bench-91m"]).to("cuda", torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()}")
    with torch.no_grad():
        if not args.no_sweep:
            sweep(model, args.batches, args.sweep_only)
        for batch in args.batches:
            took = step_microseconds(model, batch)
            limit = hbm_limit_microseconds(model, batch)
            print(f"\n| batch {batch} | {took:.1f} us/step | {batch / took * 1e6:,.0f} bytes/s | "
                  f"HBM limit {limit:.1f} us/step ({batch / limit * 1e6:,.0f} bytes/s) |")
            kernel_table(model, batch)
        kernel_table(model, 1, span=8)
        for length in args.prefill_lengths:
            prefill_table(model, length)
        launch_overhead(model)


if __name__ == "__main__":
    main()

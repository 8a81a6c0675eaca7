"""GPU benchmark of the Triton path at ``bench-91m``, beside the official mamba_ssm figures and a byte Transformer.

Checks the kernels against the PyTorch backends at real shapes first, then measures training bytes/s
(fp32 params, bf16 autocast, fused AdamW, forward + backward + step) with peak memory, decoding bytes/s
(``model.step`` replayed from a CUDA graph) and prefill bytes/s. Prints markdown tables for BENCHMARKS.md.

    PYTHONPATH=src python3 benchmarks/gpu.py              # one CUDA GPU, a few minutes
    PYTHONPATH=src python3 benchmarks/gpu.py --sweep      # also time alternative scan tile sizes first
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from mambabyte import cuda_graphs
from mambabyte.architectures import build_model, presets_for
from mambabyte.generate import read_bytes
from mambabyte.ops import causal_conv1d, triton_scan
from mambabyte.ops.dispatch import selective_step_torch
from mambabyte.ops.selective_scan import selective_scan_chunked
from mambabyte.ops.triton_step import selective_step_triton

# Official mamba_ssm 2.3.2 on the lent H100 (issue 5), and the targets set there.
PREFILL = "prefill bytes/s, batch 1, 8192 bytes"
MAMBA_SSM = {
    "training bytes/s, B16 x L2048": (138_451, ">= 270,000"),
    "training bytes/s, B4 x L8192": (135_092, ">= 270,000"),
    "training peak memory GB, B4 x L8192": (23.6, "<= 23.6"),
    "decode bytes/s, batch 1": (1_003, ">= 3,000"),
    "decode bytes/s, batch 64": (41_743, ">= 80,000"),
    PREFILL: (237_322, ">= 500,000"),
}
GRAPH_PREFILL = f"{PREFILL}, from a prompt graph (GRAPH_PROMPTS)"  # compared with the same mamba_ssm row
TRAIN_SHAPES = ((16, 2048), (4, 8192))
DEVICE = "cuda"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def scan_inputs(batch, length, d_inner, d_state, dtype, reset_rate=0.01):
    """Random scan inputs of realistic magnitudes on the GPU (never zeros)."""
    randn = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    inputs = dict(
        x=randn(batch, length, d_inner).to(dtype), dt=(0.5 * randn(batch, length, d_inner)).to(dtype),
        A=-torch.exp(torch.log(torch.arange(1.0, d_state + 1, device=DEVICE)) + 0.3 * randn(d_inner, d_state)),
        B=randn(batch, length, d_state).to(dtype), C=randn(batch, length, d_state).to(dtype),
        D=1 + 0.1 * randn(d_inner), dt_bias=-4 + randn(d_inner), z=randn(batch, length, d_inner).to(dtype),
        initial_state=randn(batch, d_inner, d_state),
    )
    return inputs, torch.rand(batch, length, device=DEVICE) < reset_rate


def scan_with_grads(scan, inputs, reset, seed=0):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, final = scan(**leaves, reset=reset)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, device=DEVICE, generator=g)).sum()
    loss = loss + (final * torch.randn(final.shape, device=DEVICE, generator=g)).sum()
    loss.backward()
    return {"y": y, "final state": final, **{f"grad {k}": v.grad for k, v in leaves.items()}}


def check_kernels() -> bool:
    """Triton scan and step against the chunked PyTorch backend at real shapes; prints relative errors."""
    print("## Kernel checks at real shapes (relative error ||triton - pytorch|| / ||pytorch||)\n")
    ok = True
    for dtype, limit in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
        torch.manual_seed(0)
        inputs, reset = scan_inputs(2, 1000, 1536, 16, dtype)
        ours = scan_with_grads(triton_scan.selective_scan_triton, inputs, reset)
        expected = scan_with_grads(selective_scan_chunked, inputs, reset)
        errors = {name: relative_error(ours[name], expected[name]) for name in expected}
        worst = max(errors.values())
        ok &= worst < limit
        print(f"scan {str(dtype)[6:]} B2 L1000 D1536 N16, reset + initial state: worst {worst:.2e} "
              f"(limit {limit:.0e}); " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    ok &= check_conv()
    inputs, _ = scan_inputs(64, 1, 1536, 16, torch.bfloat16)
    per_t = {k: inputs[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    args = dict(A=inputs["A"], D=inputs["D"], dt_bias=inputs["dt_bias"], state=inputs["initial_state"], **per_t)
    (y, state), (y_ref, state_ref) = selective_step_triton(**args), selective_step_torch(**args)
    step_error = max(relative_error(y, y_ref), relative_error(state, state_ref))
    ok &= step_error < 1e-2
    print(f"step bf16 B64 D1536 N16: {step_error:.2e}\n")
    return ok


def check_conv() -> bool:
    """Triton causal conv (output, window, all gradients) against the PyTorch conv run on the CPU."""
    torch.manual_seed(0)
    leaves = dict(x=torch.randn(2, 1000, 1536), weight=torch.randn(1536, 1, 4), bias=torch.randn(1536),
                  conv_state=torch.randn(2, 1536, 3))
    reset = torch.rand(2, 1000) < 0.01
    results = []
    for device in (DEVICE, "cpu"):
        inputs = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
        out, window = causal_conv1d(**inputs, reset=reset.to(device))
        g = torch.Generator(device="cpu").manual_seed(1)
        ((out * torch.randn(out.shape, generator=g).to(device)).sum() + window.square().sum()).backward()
        results.append({"out": out, "window": window, **{f"grad {k}": v.grad for k, v in inputs.items()}})
    errors = {k: relative_error(results[0][k].cpu(), results[1][k]) for k in results[1]}
    worst = max(errors.values())
    print(f"conv fp32 B2 L1000 D1536 K4, reset + window: worst {worst:.2e}; "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return worst < 1e-4


def check_model_loss() -> None:
    """bench-91m loss and gradient norm, Triton against chunked backend (same weights, same bytes)."""
    torch.manual_seed(0)
    model = build_model(presets_for("mambabyte")["bench-91m"]).to(DEVICE)
    ids = torch.randint(0, 256, (2, 513), device=DEVICE)
    results = {}
    try:
        for backend in ("triton", "chunked"):
            os.environ["MAMBABYTE_SCAN"] = backend
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results[backend] = (loss.item(), grads)
    finally:
        os.environ.pop("MAMBABYTE_SCAN")
    (loss_t, g_t), (loss_c, g_c) = results["triton"], results["chunked"]
    print(f"bench-91m B2 L512 bf16 autocast: loss triton {loss_t:.6f} chunked {loss_c:.6f}; "
          f"all-gradient relative difference {relative_error(g_t, g_c):.2e}\n")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sweep_tiles() -> None:
    """Forward and forward+backward time of the scan alone (one layer, B16 L2048 bf16) for a few tile sizes;
    keeps the fastest for the rest of the run."""
    print("## Scan tile sweep (one layer, B16 x L2048, d_inner 1536, d_state 16, bf16)\n")
    print("| BLOCK_T | BLOCK_D | warps | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|")
    inputs, _ = scan_inputs(16, 2048, 1536, 16, torch.bfloat16)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    grad_y = torch.randn(16, 2048, 1536, device=DEVICE, dtype=torch.bfloat16)
    best = None
    for tile_t, tile_d, warps in ((16, 32, 1), (32, 32, 1), (64, 32, 1), (32, 64, 2)):
        config = dict(BLOCK_T=tile_t, BLOCK_D=tile_d, fwd_warps=warps, bwd_warps=warps)
        triton_scan.CONFIG.update(config)

        def forward():
            with torch.no_grad():
                triton_scan.selective_scan_triton(**leaves)

        def forward_backward():
            y, _ = triton_scan.selective_scan_triton(**leaves)
            y.backward(grad_y)

        forward_backward()
        fwd, both = median_ms(forward, 10), median_ms(forward_backward, 5)
        print(f"| {tile_t} | {tile_d} | {warps} | {fwd:.2f} | {both:.2f} |", flush=True)
        if best is None or both < best[0]:
            best = (both, config)
    triton_scan.CONFIG.update(best[1])
    print(f"\nkept {best[1]}\n")


def training_rate(arch: str, batch: int, length: int, steps: int = 6) -> tuple[float, float]:
    """(bytes/s, peak GB) of fwd+bwd+AdamW steps: fp32 params, bf16 autocast, fused AdamW."""
    torch.manual_seed(0)
    model = build_model(presets_for(arch)["bench-91m"]).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 256, (batch, length + 1), device=DEVICE)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rate = batch * length * steps / (time.perf_counter() - start)
        return rate, torch.cuda.max_memory_allocated() / 1e9
    except torch.cuda.OutOfMemoryError:
        return float("nan"), float("nan")
    finally:
        del model, optimizer
        torch.cuda.empty_cache()


SCAN_POLICIES = (  # ops.triton_scan.CONFIG overrides compared by --sweep-scan
    dict(),  # the defaults
    dict(BLOCK_T=32),  # fewer saved chunk states: less memory, a longer recompute window in the backward
    dict(BLOCK_T=8),  # a smaller recompute scratch (more saved states)
    dict(bf16_states=False),  # fp32 saved states: +2.4 GB
    dict(BLOCK_D=16, min_block_d=16),  # both directions on 16-channel tiles
)


def compiled_resources(kernel) -> str:
    """Registers and spills per thread of each compiled variant of a Triton kernel (spills go to local memory)."""
    try:
        variants = [compiled for cache in kernel.device_caches.values() for compiled in cache[0].values()]
        return ", ".join(f"{compiled.n_regs} registers, {compiled.n_spills} spills" for compiled in variants)
    except (AttributeError, IndexError, TypeError, KeyError):  # the cache's layout changes between Triton versions
        return "n/a"


def sweep_scan() -> None:
    """Training bytes/s, peak memory and prefill bytes/s for a few tile and segment policies of the scan."""
    kept = dict(triton_scan.CONFIG)
    print("| scan CONFIG overrides | B16 x L2048 | B4 x L8192 | peak GB, B4 x L8192 | prefill 8192 |")
    print("|---|---|---|---|---|")
    for policy in SCAN_POLICIES:
        triton_scan.CONFIG.update(kept, **policy)
        (short, _), (long, peak) = (training_rate("mambabyte", batch, length, steps=4) for batch, length in TRAIN_SHAPES)
        prefill = inference_rates(decode=False)[PREFILL]
        print(f"| {policy} | {short:,.0f} | {long:,.0f} | {peak:.1f} | {prefill:,.0f} |", flush=True)
    triton_scan.CONFIG.update(kept)
    for kernel in (triton_scan._scan_fwd_kernel, triton_scan._scan_bwd_kernel):
        print(f"\n{getattr(kernel, '__name__', kernel)}: {compiled_resources(kernel)}")


def profile_training_step(batch: int = 16, length: int = 2048) -> None:
    """The CUDA kernels that take the most time in one bench-91m training step (after two warm-up steps)."""
    model = build_model(presets_for("mambabyte")["bench-91m"]).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 256, (batch, length + 1), device=DEVICE)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
    print(f"\n## Profile of one training step, B{batch} x L{length}\n")
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    del model, optimizer
    torch.cuda.empty_cache()


def decode_graph(model, batch: int) -> torch.cuda.CUDAGraph:
    """One greedy decoding step captured in a CUDA graph: ``model.step_`` writes the next state over the state."""
    state = model.init_state(batch)
    ids = torch.randint(0, 256, (batch,), device=DEVICE)

    def one_byte():
        ids.copy_(model.step_(ids, state).argmax(-1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            one_byte()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_byte()
    return graph


def decode_rate(model, batch: int, steps: int) -> float:
    """Bytes/s of greedy decoding, one ``decode_graph`` replay per byte."""
    graph = decode_graph(model, batch)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def inference_rates(decode: bool = True) -> dict[str, float]:
    """Decoding (batch 1 and 64) and prefill (batch 1, 8192 bytes) bytes/s of bench-91m in bf16 (as mamba_ssm's
    figures: bf16 weights, fp32 SSM state)."""
    torch.manual_seed(0)
    model = build_model(presets_for("mambabyte")["bench-91m"]).to(DEVICE, torch.bfloat16).eval()
    rates = {}
    with torch.no_grad():
        if decode:
            rates["decode bytes/s, batch 1"] = decode_rate(model, 1, 500)
            rates["decode bytes/s, batch 64"] = decode_rate(model, 64, 200)
        ids = torch.randint(0, 256, (1, 8192), device=DEVICE)
        model(ids, return_state=True)
        rates[PREFILL] = 8192 / (median_ms(lambda: model(ids, return_state=True), 5) / 1e3)
        chosen, cuda_graphs.GRAPH_PROMPTS = cuda_graphs.GRAPH_PROMPTS, True  # the user's path (read_bytes)
        try:
            read_bytes(model, ids)  # captures it
            rates[GRAPH_PREFILL] = 8192 / (median_ms(lambda: read_bytes(model, ids), 5) / 1e3)
        finally:
            cuda_graphs.GRAPH_PROMPTS = chosen
    return rates


def training_rows(arch: str) -> dict[str, float]:
    """Training bytes/s and peak GB of ``arch`` at every TRAIN_SHAPES, keyed as the summary table's rows."""
    rows = {}
    for batch, length in TRAIN_SHAPES:
        rate, peak = training_rate(arch, batch, length)
        rows[f"training bytes/s, B{batch} x L{length}"] = rate
        rows[f"training peak memory GB, B{batch} x L{length}"] = peak
        print(f"{arch} B{batch} x L{length}: {rate:,.0f} bytes/s, peak {peak:.1f} GB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time alternative scan tile sizes and keep the best")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one training step")
    parser.add_argument("--skip-chunked", action="store_true", help="skip the pure-PyTorch backend's training rows")
    parser.add_argument("--inference-only", action="store_true", help="only the decoding and prefill rows")
    parser.add_argument("--sweep-scan", action="store_true", help="only compare tile and segment policies of the scan")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton_scan.triton.__version__}\n")
    if args.sweep_scan:
        return sweep_scan()
    if args.inference_only:
        for name, rate in inference_rates().items():
            official, target = MAMBA_SSM[PREFILL if name == GRAPH_PREFILL else name]
            print(f"| {name} | {rate:,.0f} | {official:,} | {target} |")
        return
    if not check_kernels():
        print("KERNEL CHECK FAILED")
    try:
        check_model_loss()
    except RuntimeError as error:  # the PyTorch side of the comparison can fail on its own
        print(f"model loss comparison failed: {error}\n")
    if args.sweep:
        sweep_tiles()
    ours = training_rows("mambabyte")
    ours.update(inference_rates())
    transformer = training_rows("transformer")
    chunked = []
    if not args.skip_chunked:  # the PyTorch scan keeps (batch, length, d_inner, d_state) tensors: small shapes only
        for backend in ("triton", "chunked"):
            os.environ["MAMBABYTE_SCAN"] = backend
            for batch, length in ((1, 2048), (2, 2048)):
                rate, peak = training_rate("mambabyte", batch, length, steps=3)
                chunked.append(f"| {backend} | B{batch} x L{length} | {rate:,.0f} | {peak:.1f} |")
        os.environ.pop("MAMBABYTE_SCAN")
    if args.profile:
        profile_training_step()

    print("\n## bench-91m on this GPU\n")
    print("| measurement | mambabyte (Triton) | mamba_ssm 2.3.2 | target | byte Transformer (SDPA) |")
    print("|---|---|---|---|---|")
    for name, (official, target) in MAMBA_SSM.items():
        value = ours[name]
        shown = f"{value:.1f}" if "GB" in name else f"{value:,.0f}"
        other = transformer.get(name)
        other_shown = "" if other is None else (f"{other:.1f}" if "GB" in name else f"{other:,.0f}")
        print(f"| {name} | {shown} | {official:,} | {target} | {other_shown} |")
    official, target = MAMBA_SSM[PREFILL]
    print(f"| {GRAPH_PREFILL} | {ours[GRAPH_PREFILL]:,.0f} | {official:,} | {target} | |")
    peak_2048 = ours["training peak memory GB, B16 x L2048"]
    print(f"| training peak memory GB, B16 x L2048 | {peak_2048:.1f} | | | "
          f"{transformer['training peak memory GB, B16 x L2048']:.1f} |")
    if chunked:
        print("\n| mambabyte training, scan backend | shape | bytes/s | peak GB |\n|---|---|---|---|")
        print("\n".join(chunked))


if __name__ == "__main__":
    main()

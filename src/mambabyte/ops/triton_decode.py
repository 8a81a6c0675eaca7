"""A whole Mamba block for a few positions (decoding, draft verification) in four Triton kernels.

Decoding one byte through PyTorch ops launches ~30 small kernels per layer; at batch 1 the launches, not
the GPU, set the speed. Here a block is:

1. ``norm_linear``: RMSNorm and in_proj (the same kernel is the model's final norm and byte head);
2. ``_conv_x_proj_kernel``: the causal conv over the carried window, SiLU, and x_proj, with the channels
   split over programs whose partial x_proj sums the next kernel adds;
3. ``_scan_kernel``: dt_proj, softplus, the selective-scan update, C . h, the D skip and the SiLU(z) gate,
   walking the positions of the span with the state on chip;
4. ``_out_proj_kernel``: out_proj and the residual add.

Rows are (batch, position) pairs and every row's arithmetic is the same whatever the batch or span length,
so reading a span here gives bit for bit what stepping through it one position at a time gives: speculative
decoding's verification agrees exactly with plain decoding. Conv inputs are rounded to the conv state's
dtype before use, as they are when they come back from the state.

Programmatic dependent launch (Hopper, ``CONFIG["pdl"]``): each kernel is launched while the previous one
runs, asks L2 for its weights (``prefetch``), loads what the previous kernels do not write (parameters; the
scan's state and out_proj's residual) and then waits (``gdc_wait``) for the previous kernel to finish before it
reads that kernel's output or writes anything, so launch gaps and memory latency overlap work. A kernel lets
the next one launch once it has waited; with ``early_launch`` (a per-row-count tile) the conv, scan and
out_proj kernels do so as they start. norm + in_proj always waits first, so every launch after it in the block
starts after the previous block (and all before it) has finished: the state and residual loaded early are
complete.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambabyte.ops.triton_scan import interpreting, multiprocessors, sigmoid, softplus, total

BLOCK_M = 16  # rows per program: tl.dot's smallest tile; decoding one row wastes the rest, the weights dominate
# GPU tiles from benchmarks/decode_kernels.py's sweep on an H100 at bench-91m, bf16 (session 4: 421 us/step at
# batch 1, 825 at batch 64): CONFIG, with MANY_ROWS over it for launches over more rows than BLOCK_M (batch 64).
# MANY_ROWS may only hold output tile widths, which leave each row's arithmetic unchanged, so that a span's
# rows give the bits of single steps. pdl: programmatic dependent launch where the GPU and Triton have it
# (never under the interpreter): 509 -> 443 us/step at batch 1, 904 -> 829 at batch 64. conv_warps: the
# conv + x_proj kernel's own warps (None: ``warps``). Session 5 sweep: scan_programs_per_sm 1, 2 and 4 within
# 0.3% (8: +27% at batch 64). prefetch (L2 prefetch of the weights before waiting, with pdl) and the scan's
# state and out_proj's residual loaded before waiting: 424 -> 388 us/step at batch 1, 820 -> 791 at batch 64
# (session 6). Tried and removed: the scan adding the split partial sums in an unrolled loop (batch 1 416.7 vs
# ~423 us/step, batch 64 1,117 vs 829; and in fp32 not the bits of the loop on the GPU). early_launch: batch 1
# 387 -> 430 us/step, batch 64 789 -> 781 (session 6), so only for many rows. Also tried: the scan loading every
# split's share as one tile (session 6: no faster at batch 1 than this, its registers doubled the scan's time at
# batch 64, and in fp32 a span kept other state bits than its steps); the last conv program of a row block
# adding the shares (a ticket counter: its serial loads cost 6 us per layer).
CONFIG = dict(in_block_n=32, in_block_k=256, out_block_n=32, out_block_k=256, conv_block_k=128, conv_splits=24,
              scan_programs_per_sm=4, warps=4, conv_warps=None, pdl=True, prefetch=True,
              early_launch=False)
MANY_ROWS = dict(in_block_n=64, out_block_n=64, early_launch=True)


def _tiles(rows: int) -> dict:
    """The tiles of a launch over ``rows`` (batch x span) rows."""
    return {**CONFIG, **MANY_ROWS} if rows > BLOCK_M else CONFIG


def _precision(weight: Tensor) -> str:
    """How tl.dot multiplies: fp32 weights get full-precision products (no TF32), as PyTorch's matmul gives
    them; "upcast" does bf16 products in fp32, which is exact, for the interpreter (its bf16 tl.dot is wrong)."""
    if interpreting() and weight.dtype != torch.float32:
        return "upcast"
    return "ieee" if weight.dtype == torch.float32 else "tf32"


@triton.jit
def _wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """With programmatic dependent launch: wait until the previous kernel has finished and its writes are
    visible. Without it, nothing to do."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _let_next_kernel_launch(USE_PDL: tl.constexpr):
    """With programmatic dependent launch: the next kernel may launch now (it waits likewise before reading
    what this one writes). Without it, nothing to do."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_rows(row_ptrs, mask_rows, row_elements, LINES: tl.constexpr, LINE_ELEMENTS: tl.constexpr):
    """Ask L2 for the first ``row_elements`` elements after each of ``row_ptrs`` (one prefetch per 128-byte
    line), without waiting for them: a kernel does it before ``gdc_wait`` for weights no kernel writes."""
    lines = tl.arange(0, LINES) * LINE_ELEMENTS
    mask = mask_rows[:, None] & (lines < row_elements)[None, :]
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; } mov.u32 $0, 0;",
                              "=r,l,r", [row_ptrs[:, None] + lines[None, :], mask.to(tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _dot(a, w, PRECISION: tl.constexpr):
    """a @ w with fp32 accumulation; a is cast to w's dtype first."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(w.dtype), w, input_precision=PRECISION)


@triton.jit
def _norm_linear_kernel(h_ptr, norm_ptr, w_ptr, out_ptr, M, K, N, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
                        LINE_ELEMENTS: tl.constexpr):
    """out (M, N) fp32 = (rms_norm(h) in the weights' dtype * norm) @ w.T; h (M, K) fp32, w (N, K)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    if PREFETCH:
        if tl.program_id(0) == 0:  # one program per weight tile asks
            _prefetch_rows(w_ptr + cols * K, mask_n, K, LINES, LINE_ELEMENTS)
    _wait_for_previous_kernel(USE_PDL)
    _let_next_kernel_launch(USE_PDL)  # only now: what launches after this kernel may read the block's input
    squares = tl.full((BLOCK_M,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (ks < K)[None, :]
        v = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=mask, other=0.0)
        squares += total(v * v, axis=1)
    rstd = 1.0 / tl.sqrt(squares / K + eps)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        v = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        scale = tl.load(norm_ptr + ks, mask=mask_k, other=0.0)
        # RMSNorm as the model computes it: normalised in fp32, rounded to the weights' dtype, times the weight
        a = ((v * rstd[:, None]).to(scale.dtype).to(tl.float32) * scale.to(tl.float32)[None, :]).to(scale.dtype)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(a, w, PRECISION)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_x_proj_kernel(xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, wx_ptr, xc_ptr, parts_ptr, conv_out_ptr,
                        M, span, d_inner, n_out, per_split,
                        KCONV: tl.constexpr, KEEP_STATES: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
                        EARLY_LAUNCH: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
                        LINE_ELEMENTS: tl.constexpr):
    """Conv + SiLU of this program's channels for BLOCK_M rows, and their share of x_proj (partial sums)."""
    if EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    mask_m = rows < M
    b = rows // span
    t = rows % span
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_out
    # where each row's conv state goes: per position, or once per sequence after its last position
    state_rows = rows if KEEP_STATES else b
    writes_state = mask_m if KEEP_STATES else mask_m & (t == span - 1)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    c_end = tl.minimum(split * per_split + per_split, d_inner)
    if PREFETCH:
        if tl.program_id(0) == 0:  # one program per weight tile asks
            _prefetch_rows(wx_ptr + offs_r * d_inner + split * per_split, mask_r, c_end - split * per_split, LINES,
                           LINE_ELEMENTS)
    _wait_for_previous_kernel(USE_PDL)
    if not EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    for c0 in range(split * per_split, c_end, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        mask_c = cols < c_end
        mask = mask_m[:, None] & mask_c[None, :]
        bias = tl.load(conv_b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
        out = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32) + bias[None, :]
        for j in tl.static_range(KCONV):
            # tap j reads position t - (KCONV-1) + j: from this span's in_proj output, or from the carried window
            from_span = (t + j >= KCONV - 1)[:, None]
            fresh = tl.load(xz_ptr + (rows + j - (KCONV - 1))[:, None] * (2 * d_inner) + cols[None, :],
                            mask=mask & from_span, other=0.0)
            carried = tl.load(conv_state_ptr + (b[:, None] * d_inner + cols[None, :]) * (KCONV - 1) + (t + j)[:, None],
                              mask=mask & ~from_span, other=0.0)
            v = tl.where(from_span, fresh.to(carried.dtype), carried)
            tap = tl.load(conv_w_ptr + cols * KCONV + j, mask=mask_c, other=0.0).to(tl.float32)
            out += v.to(tl.float32) * tap[None, :]
            if j > 0:
                tl.store(conv_out_ptr + (state_rows[:, None] * d_inner + cols[None, :]) * (KCONV - 1) + (j - 1), v,
                         mask=writes_state[:, None] & mask_c[None, :])
        x = out * sigmoid(out)
        tl.store(xc_ptr + rows[:, None] * d_inner + cols[None, :], x, mask=mask)
        w = tl.load(wx_ptr + offs_r[None, :] * d_inner + cols[:, None], mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        acc += _dot(x, w, PRECISION)
    tl.store(parts_ptr + (split * M + rows[:, None]) * n_out + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _scan_kernel(xz_ptr, xc_ptr, parts_ptr, wdt_ptr, dt_bias_ptr, A_log_ptr, D_ptr, ssm_ptr, y_ptr, ssm_out_ptr,
                 M, span, d_inner, dt_rank, d_state, n_out, n_splits,
                 KEEP_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr):
    """dt_proj, softplus, the state update, readout, D skip and gate for BLOCK_D channels of one sequence."""
    if EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_r = offs_r < dt_rank
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * d_state + offs_n[None, :]
    w_dt = tl.load(wdt_ptr + offs_d[:, None] * dt_rank + offs_r[None, :], mask=mask_d[:, None] & mask_r[None, :],
                   other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(A_log_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32))
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    # the state too: written before this block's norm + in_proj, which waited for it (see the module docstring)
    h = tl.load(ssm_ptr + b * d_inner * d_state + dn, mask=mask_dn, other=0.0)
    _wait_for_previous_kernel(USE_PDL)  # everything above is loaded while the previous kernel runs
    if not EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    for t in range(0, span):
        m = b * span + t
        dt_low = tl.full((BLOCK_R,), 0.0, tl.float32)
        Bt = tl.full((BLOCK_N,), 0.0, tl.float32)
        Ct = tl.full((BLOCK_N,), 0.0, tl.float32)
        for s in range(0, n_splits):
            part = parts_ptr + (s * M + m) * n_out
            dt_low += tl.load(part + offs_r, mask=mask_r, other=0.0)
            Bt += tl.load(part + dt_rank + offs_n, mask=mask_n, other=0.0)
            Ct += tl.load(part + dt_rank + d_state + offs_n, mask=mask_n, other=0.0)
        delta = softplus(total(w_dt * dt_low[None, :], axis=1) + dt_bias)
        x = tl.load(xc_ptr + m * d_inner + offs_d, mask=mask_d, other=0.0)
        z = tl.load(xz_ptr + m * 2 * d_inner + d_inner + offs_d, mask=mask_d, other=0.0)
        h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bt[None, :]
        y = (total(h * Ct[None, :], axis=1) + Dskip * x) * z * sigmoid(z)
        tl.store(y_ptr + m * d_inner + offs_d, y, mask=mask_d)
        if KEEP_STATES:
            tl.store(ssm_out_ptr + m * d_inner * d_state + dn, h, mask=mask_dn)
    if not KEEP_STATES:
        tl.store(ssm_out_ptr + b * d_inner * d_state + dn, h, mask=mask_dn)


@triton.jit
def _out_proj_kernel(y_ptr, w_ptr, h_ptr, out_ptr, M, K, N,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                     USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
                     LINE_ELEMENTS: tl.constexpr):
    """out (M, N) fp32 = h + y @ w.T; y (M, K) in the weights' dtype, h (M, N) fp32."""
    if EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    if PREFETCH:
        if tl.program_id(0) == 0:  # one program per weight tile asks
            _prefetch_rows(w_ptr + cols * K, mask_n, K, LINES, LINE_ELEMENTS)
    # the block's input: written before its norm + in_proj, which waited for it
    residual = tl.load(h_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    _wait_for_previous_kernel(USE_PDL)
    if not EARLY_LAUNCH:
        _let_next_kernel_launch(USE_PDL)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(y_ptr + rows[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(a, w, PRECISION)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], residual + acc, mask=mask)


def _scan_block_d(batch: int, d_inner: int, programs_per_sm: int, device: torch.device) -> int:
    """Channels per scan program: the widest tile that keeps the GPU busy (tiny under the interpreter)."""
    if interpreting():
        return 4
    wanted = programs_per_sm * multiprocessors(device)
    return next((block for block in (128, 64, 32) if batch * triton.cdiv(d_inner, block) >= wanted), 16)


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a Hopper or newer GPU and a Triton that launches with it."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and hasattr(tl.extra.cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9)


def _launch(device: torch.device) -> dict:
    """The USE_PDL constexpr and launch option of every kernel here."""
    use = bool(CONFIG["pdl"]) and not interpreting() and _pdl_supported(device)
    return dict(USE_PDL=True, launch_pdl=True) if use else dict(USE_PDL=False)


PIPELINED_BYTES = 180 * 1024  # shared memory for a kernel's pipelined tiles (an H100 block has 227 KB; the rest
# goes to layout conversions): fp32 weights at bench-91m need fewer stages than Triton's default 3


def _stages(bytes_per_stage: int) -> int:
    """Software-pipeline stages for a K loop whose tiles take ``bytes_per_stage`` of shared memory."""
    return max(1, min(3, PIPELINED_BYTES // bytes_per_stage))


def _blocks(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _prefetch(weight: Tensor, row_elements: int, launch: dict, tiles: dict) -> dict:
    """The PREFETCH, LINES and LINE_ELEMENTS constexprs of a kernel whose programs read ``row_elements`` of each
    of their rows of ``weight``: prefetching only pays where the kernel launches before the previous one ends."""
    line_elements = 128 // weight.element_size()
    return dict(PREFETCH=bool(tiles["prefetch"]) and launch["USE_PDL"], LINE_ELEMENTS=line_elements,
                LINES=triton.next_power_of_2(triton.cdiv(row_elements, line_elements)))


def norm_linear(hidden: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """hidden (..., K) fp32 -> (rms_norm(hidden) * norm_weight) @ weight.T (..., N) fp32; weight (N, K)."""
    rows = hidden.reshape(-1, hidden.shape[-1]).float().contiguous()
    (M, K), N = rows.shape, weight.shape[0]
    out = torch.empty(M, N, device=hidden.device, dtype=torch.float32)
    tiles = _tiles(M)
    launch = _launch(hidden.device)
    block_n, block_k = tiles["in_block_n"], tiles["in_block_k"]
    stages = _stages(((BLOCK_M + block_n) * weight.element_size() + BLOCK_M * 4) * block_k)
    _norm_linear_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, block_n))](
        rows, norm_weight.to(weight.dtype), weight.contiguous(), out, M, K, N, eps, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=_precision(weight), num_warps=tiles["warps"], num_stages=stages,
        **_prefetch(weight, K, launch, tiles), **launch)
    return out.reshape(*hidden.shape[:-1], N)


def block_span(hidden: Tensor, norm_weight: Tensor, eps: float, in_proj_weight: Tensor, conv_weight: Tensor,
               conv_bias: Tensor, x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, A_log: Tensor,
               D: Tensor, out_proj_weight: Tensor, conv_state: Tensor, ssm_state: Tensor, keep_states: bool = False,
               in_place: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A pre-norm block over a short span from a state: hidden (batch, span, d_model) fp32 ->
    (hidden + mixer(norm(hidden)), conv state, ssm state), no autograd.

    The states are those after the last position, or with ``keep_states`` after every position:
    conv (batch, span, d_inner, d_conv - 1), ssm (batch, span, d_inner, d_state) fp32. ``in_place`` writes
    the states after the last position over ``conv_state`` and ``ssm_state`` (contiguous; each program reads
    its part of a state before it writes it), sparing a decoding loop the copies.
    """
    batch, span, d_model = hidden.shape
    d_inner, kernel = D.shape[0], conv_weight.shape[-1]
    dt_rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
    n_out = x_proj_weight.shape[0]
    M = batch * span
    launch = _launch(hidden.device)
    rows = hidden.reshape(M, d_model).float().contiguous()
    xz = norm_linear(rows, norm_weight, eps, in_proj_weight)
    dtype = in_proj_weight.dtype
    tiles = _tiles(M)
    block_k = tiles["conv_block_k"]
    chunks = triton.cdiv(d_inner, block_k)
    splits = min(tiles["conv_splits"], chunks)
    per_split = triton.cdiv(chunks, splits) * block_k
    splits = triton.cdiv(d_inner, per_split)
    states_shape = (batch, span) if keep_states else (batch,)
    if in_place:
        if keep_states or not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
            raise ValueError("in_place needs contiguous states and keep_states=False")
        conv_out, ssm_out = conv_state, ssm_state
    else:
        conv_out = torch.empty(*states_shape, d_inner, kernel - 1, device=hidden.device, dtype=conv_state.dtype)
        ssm_out = torch.empty(*states_shape, d_inner, d_state, device=hidden.device, dtype=torch.float32)
    xc = torch.empty(M, d_inner, device=hidden.device, dtype=torch.float32)
    parts = torch.empty(splits, M, n_out, device=hidden.device, dtype=torch.float32)
    block_r = _blocks(n_out)
    _conv_x_proj_kernel[(triton.cdiv(M, BLOCK_M), splits)](
        xz, conv_state.contiguous(), conv_weight.contiguous(), conv_bias,
        x_proj_weight.contiguous(), xc, parts, conv_out, M, span, d_inner, n_out, per_split,
        KCONV=kernel, KEEP_STATES=keep_states, BLOCK_M=BLOCK_M, BLOCK_K=block_k, BLOCK_R=block_r,
        PRECISION=_precision(x_proj_weight), num_warps=tiles["conv_warps"] or tiles["warps"],
        num_stages=_stages((block_r * x_proj_weight.element_size() + BLOCK_M * 4) * block_k),
        EARLY_LAUNCH=tiles["early_launch"], **_prefetch(x_proj_weight, per_split, launch, tiles), **launch)
    y = torch.empty(M, d_inner, device=hidden.device, dtype=dtype)
    block_d = _scan_block_d(batch, d_inner, tiles["scan_programs_per_sm"], hidden.device)
    _scan_kernel[(batch, triton.cdiv(d_inner, block_d))](
        xz, xc, parts, dt_proj_weight.contiguous(), dt_bias, A_log.contiguous(), D,
        ssm_state.float().contiguous(), y, ssm_out, M, span, d_inner, dt_rank, d_state, n_out, splits,
        KEEP_STATES=keep_states, BLOCK_D=block_d, BLOCK_R=_blocks(dt_rank),
        BLOCK_N=max(2, triton.next_power_of_2(d_state)), EARLY_LAUNCH=tiles["early_launch"], num_warps=4, **launch)
    out = torch.empty_like(rows)
    block_n, block_k = tiles["out_block_n"], tiles["out_block_k"]
    _out_proj_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(d_model, block_n))](
        y, out_proj_weight.contiguous(), rows, out, M, d_inner, d_model, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=_precision(out_proj_weight), num_warps=tiles["warps"],
        num_stages=_stages((BLOCK_M + block_n) * block_k * out_proj_weight.element_size()),
        EARLY_LAUNCH=tiles["early_launch"], **_prefetch(out_proj_weight, d_inner, launch, tiles), **launch)
    return out.reshape(batch, span, d_model), conv_out, ssm_out

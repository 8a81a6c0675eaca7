"""Triton kernels for the selective scan: same contract as ``selective_scan_ref`` (see ops.selective_scan).

One program owns BLOCK_D channels of one sequence (one warp, a channel per lane) and walks the sequence one
position at a time, its state (d_state, BLOCK_D) in registers with the state index inside each thread, so
the readout C . h needs no communication; softplus(dt + dt_bias), the D skip and the SiLU(z) gate are fused
and the next position's inputs are loaded before the current one is computed. The forward saves the state
every BLOCK_T positions. The backward walks those chunks in reverse: it recomputes a chunk's states into
this program's own scratch rows (read back by the same threads, so no barrier), then runs the adjoint
recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} backwards through the chunk. dB and dC sum over channels, so
each program adds its lanes' share with one atomic per state index and position.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it, on tiny tiles).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambabyte.errors import UserError


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def softplus(v):
    """log(1 + exp(v)) in fp32, with log1p computed accurately for small exp(v) (Kahan's trick)."""
    w = tl.exp(-tl.abs(v))
    one_plus = 1.0 + w
    log1p = tl.where(one_plus == 1.0, w, tl.log(one_plus) * w / (one_plus - 1.0))
    return tl.maximum(v, 0.0) + log1p


@triton.jit
def add(a, b):
    return a + b


@triton.jit
def total(v, axis: tl.constexpr):
    """tl.sum through a combine function of ours: the interpreter runs it even when Triton was imported first."""
    return tl.reduce(v, axis, add)


@triton.jit
def sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _load_position(t, offs_d, mask_d, offs_n, mask_n, pid_b, length,
                   x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, dt_bias,
                   stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                   stride_zb, stride_zl, stride_rb, stride_rl,
                   HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """Position t's inputs in fp32: x, dt + dt_bias, z (D,), B, C (N,), and whether a document starts there."""
    md = mask_d & (offs_d * 0 + t < length)  # vector forms: the interpreter wants tensor masks
    mn = mask_n & (offs_n * 0 + t < length)
    x = tl.load(x_ptr + pid_b * stride_xb + t * stride_xl + offs_d, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dtb + t * stride_dtl + offs_d, mask=md, other=0.0).to(tl.float32) + dt_bias
    Bt = tl.load(B_ptr + pid_b * stride_Bb + t * stride_Bl + offs_n, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * stride_Cb + t * stride_Cl + offs_n, mask=mn, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_zb + t * stride_zl + offs_d, mask=md, other=0.0).to(tl.float32)
    else:
        z = x
    starts = False
    if HAS_RESET:  # one flag per state row, so that it broadcasts over the (N, D) state
        starts = tl.load(reset_ptr + pid_b * stride_rb + t * stride_rl + offs_n * 0, mask=mn, other=0) != 0
    return x, dt, Bt, Ct, z, starts


@triton.jit
def _scan_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, h0_ptr, reset_ptr,
                     y_ptr, final_ptr, chunk_states_ptr,
                     length, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                     SAVE_STATES: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """State tile (N, D): the state index runs inside each thread, channels across threads."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd = offs_n[:, None] * d_inner + offs_d[None, :]  # states are stored (state index, channel)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    if HAS_H0:
        h = tl.load(h0_ptr + state_offset + nd, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    x, dt, Bt, Ct, z, starts = _load_position(
        0, offs_d, mask_d, offs_n, mask_n, pid_b, length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, dt_bias,
        stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
        stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
    for chunk in range(0, n_chunks):
        if SAVE_STATES:
            tl.store(chunk_states_ptr + (pid_b * n_chunks + chunk) * d_inner * d_state + nd, h, mask=mask_nd)
        for t in range(chunk * BLOCK_T, tl.minimum(chunk * BLOCK_T + BLOCK_T, length)):
            # the next position's loads are issued before this position's arithmetic
            x_next, dt_next, B_next, C_next, z_next, starts_next = _load_position(
                t + 1, offs_d, mask_d, offs_n, mask_n, pid_b, length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            h = a * h + (delta * x)[None, :] * Bt[:, None]
            y = total(h * Ct[:, None], axis=0) + Dskip * x
            if HAS_Z:
                y = y * z * sigmoid(z)
            tl.store(y_ptr + (pid_b * length + t) * d_inner + offs_d, y, mask=mask_d)
            x, dt, Bt, Ct, z, starts = x_next, dt_next, B_next, C_next, z_next, starts_next
    tl.store(final_ptr + state_offset + nd, h, mask=mask_nd)


@triton.jit
def _scan_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, reset_ptr,
                     chunk_states_ptr, dy_ptr, dfinal_ptr,
                     dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddt_bias_ptr, dh0_ptr, scratch_ptr,
                     length, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunks in reverse: recompute the chunk's states into this program's scratch, then walk it backwards."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd = offs_n[:, None] * d_inner + offs_d[None, :]  # states are stored (state index, channel)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    scratch = scratch_ptr + (pid_b * tl.num_programs(0) + pid_d) * BLOCK_T * BLOCK_N * BLOCK_D
    tile = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    # flowing = a_{t+1} * g_{t+1} (plus the final state's gradient): what reaches h_t from later positions
    flowing = tl.load(dfinal_ptr + state_offset + nd, mask=mask_nd, other=0.0).to(tl.float32)
    dA = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    dD = tl.full((BLOCK_D,), 0.0, tl.float32)
    ddt_bias = tl.full((BLOCK_D,), 0.0, tl.float32)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    for step in range(0, n_chunks):
        chunk = n_chunks - 1 - step
        start = chunk * BLOCK_T
        end = tl.minimum(start + BLOCK_T, length)
        h = tl.load(chunk_states_ptr + (pid_b * n_chunks + chunk) * d_inner * d_state + nd, mask=mask_nd, other=0.0)
        for t in range(start, end):
            x, dt, Bt, Ct, z, starts = _load_position(
                t, offs_d, mask_d, offs_n, mask_n, pid_b, length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            h = a * h + (delta * x)[None, :] * Bt[:, None]
            tl.store(scratch + (t - start) * BLOCK_N * BLOCK_D + tile, h)  # read back by this same thread
        for back in range(0, end - start):
            t = end - 1 - back
            x, dt, Bt, Ct, z, starts = _load_position(
                t, offs_d, mask_d, offs_n, mask_n, pid_b, length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            h = tl.load(scratch + (t - start) * BLOCK_N * BLOCK_D + tile)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            u = (delta * x)[None, :] * Bt[:, None]
            dy = tl.load(dy_ptr + (pid_b * length + t) * d_inner + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                y = total(h * Ct[:, None], axis=0) + Dskip * x
                sig = sigmoid(z)
                tl.store(dz_ptr + (pid_b * length + t) * d_inner + offs_d, dy * y * sig * (1.0 + z * (1.0 - sig)),
                         mask=mask_d)
                dy = dy * z * sig
            g = Ct[:, None] * dy[None, :] + flowing
            # g * a_t * h_{t-1}, written as g * (h_t - u_t): no earlier state needed
            through_decay = g * (h - u)
            gB = total(g * Bt[:, None], axis=0)
            tl.store(dx_ptr + (pid_b * length + t) * d_inner + offs_d, gB * delta + dy * Dskip, mask=mask_d)
            ddt = (gB * x + total(through_decay * A, axis=0)) * sigmoid(dt)
            tl.store(ddt_ptr + (pid_b * length + t) * d_inner + offs_d, ddt, mask=mask_d)
            ddt_bias += tl.where(mask_d, ddt, 0.0)
            dD += dy * x
            dA += through_decay * delta[None, :]
            tn = (pid_b * length + t) * d_state + offs_n
            tl.atomic_add(dB_ptr + tn, total(g * (delta * x)[None, :], axis=1), mask=mask_n, sem="relaxed")
            tl.atomic_add(dC_ptr + tn, total(h * dy[None, :], axis=1), mask=mask_n, sem="relaxed")
            flowing = a * g
    tl.store(dh0_ptr + state_offset + nd, flowing, mask=mask_nd)
    tl.store(dA_ptr + state_offset + nd, dA, mask=mask_nd)
    tl.store(dD_ptr + pid_b * d_inner + offs_d, dD, mask=mask_d)
    tl.store(ddt_bias_ptr + pid_b * d_inner + offs_d, ddt_bias, mask=mask_d)


def _tiles(batch: int, d_inner: int, d_state: int, device: torch.device) -> dict:
    """Tile sizes: tiny ones under the interpreter; on a GPU, narrower channel tiles when the batch is too
    small to give every multiprocessor a few programs."""
    block_n = max(2, triton.next_power_of_2(d_state))
    if interpreting():
        return dict(BLOCK_T=8, BLOCK_D=4, BLOCK_N=block_n)
    block_d = min(CONFIG["BLOCK_D"], max(2, triton.next_power_of_2(d_inner)))
    programs_wanted = CONFIG["programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
    while block_d > CONFIG["min_block_d"] and batch * triton.cdiv(d_inner, block_d) < programs_wanted:
        block_d //= 2
    return dict(BLOCK_T=CONFIG["BLOCK_T"], BLOCK_D=block_d, BLOCK_N=block_n)


# GPU tiles, the fastest of benchmarks/gpu.py --sweep on an H100: BLOCK_T is the chunk between saved states
# (and the backward's recompute window); one warp of 32 channels keeps every reduction over d_state in-thread.
CONFIG = dict(BLOCK_T=16, BLOCK_D=32, fwd_warps=1, bwd_warps=1, programs_per_sm=8, min_block_d=8)


def _row_strides(t: Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _rows_contiguous(t: Tensor) -> Tensor:
    """A (batch, length, channels) tensor whose last dim is contiguous (views of in_proj output stay views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, z, initial_state, reset):
        x, dt, B, C = map(_rows_contiguous, (x, dt, B, C))
        z = None if z is None else _rows_contiguous(z)
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        tiles = _tiles(batch, d_inner, d_state, x.device)
        # the kernels keep states and A as (d_state, d_inner): channels contiguous
        A, D, dt_bias = A.float().t().contiguous(), D.float().contiguous(), dt_bias.float().contiguous()
        h0 = None if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
        reset_i8 = None if reset is None else reset.to(torch.int8)
        save = any(ctx.needs_input_grad)
        n_chunks = triton.cdiv(length, tiles["BLOCK_T"])
        y = torch.empty(batch, length, d_inner, device=x.device, dtype=x.dtype)
        final = torch.empty(batch, d_state, d_inner, device=x.device, dtype=torch.float32)
        chunk_states = torch.empty(batch, n_chunks if save else 0, d_state, d_inner, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(d_inner, tiles["BLOCK_D"]), batch)
        _scan_fwd_kernel[grid](
            x, dt, A, B, C, D, dt_bias, x if z is None else z, final if h0 is None else h0,
            x if reset_i8 is None else reset_i8, y, final, chunk_states, length, d_inner, d_state,
            *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C),
            *_row_strides(x if z is None else z), *(reset_i8.stride() if reset_i8 is not None else (0, 0)),
            HAS_Z=z is not None, HAS_H0=h0 is not None, HAS_RESET=reset is not None, SAVE_STATES=save,
            num_warps=CONFIG["fwd_warps"], **tiles)
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states)
            ctx.shapes = (tiles, initial_state is not None)
        return y, final.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states = ctx.saved_tensors
        tiles, has_h0 = ctx.shapes
        batch, length, d_inner = x.shape
        d_state = A.shape[0]
        dy = dy.contiguous()
        dfinal = dfinal.float().transpose(1, 2).contiguous()
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        ddt = torch.empty_like(dt, memory_format=torch.contiguous_format)
        dz = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
        dB = torch.zeros(batch, length, d_state, device=x.device, dtype=torch.float32)
        dC = torch.zeros(batch, length, d_state, device=x.device, dtype=torch.float32)
        dA = torch.empty(batch, d_state, d_inner, device=x.device, dtype=torch.float32)
        dD = torch.empty(batch, d_inner, device=x.device, dtype=torch.float32)
        ddt_bias = torch.empty(batch, d_inner, device=x.device, dtype=torch.float32)
        dh0 = torch.empty(batch, d_state, d_inner, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(d_inner, tiles["BLOCK_D"]), batch)
        # each program's recomputed chunk of states
        scratch = torch.empty(grid[0] * batch * tiles["BLOCK_T"] * tiles["BLOCK_N"] * tiles["BLOCK_D"],
                              device=x.device, dtype=torch.float32)
        _scan_bwd_kernel[grid](
            x, dt, A, B, C, D, dt_bias, x if z is None else z, x if reset_i8 is None else reset_i8,
            chunk_states, dy, dfinal, dx, ddt, dx if dz is None else dz, dB, dC, dA, dD, ddt_bias, dh0, scratch,
            length, d_inner, d_state,
            *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C),
            *_row_strides(x if z is None else z), *(reset_i8.stride() if reset_i8 is not None else (0, 0)),
            HAS_Z=z is not None, HAS_RESET=reset_i8 is not None, num_warps=CONFIG["bwd_warps"], **tiles)
        return (dx, ddt, dA.sum(0).t(), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0), ddt_bias.sum(0), dz,
                dh0.transpose(1, 2) if has_h0 else None, None)


def selective_scan_triton(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton scan: same contract and results as ``selective_scan_ref`` (y in x's dtype, final state fp32)."""
    if not (x.is_cuda or interpreting()):
        raise UserError("the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if x.shape[1] == 0:
        from mambabyte.ops.selective_scan import selective_scan_ref

        return selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, initial_state=initial_state, reset=reset)
    return _SelectiveScanTriton.apply(x, dt, A, B, C, D, dt_bias, z, initial_state, reset)

"""Triton kernels for the selective scan: same contract as ``selective_scan_ref`` (see ops.selective_scan).

One program owns BLOCK_D channels of one sequence and walks the sequence in chunks of BLOCK_T positions,
its state (BLOCK_D, d_state) kept in registers. Inside a chunk the recurrence h_t = a_t * h_{t-1} + u_t is
a parallel associative scan over time; softplus(dt + dt_bias), the D skip and the SiLU(z) gate are fused.
The forward saves the state at every chunk start; the backward walks the chunks in reverse, recomputes the
chunk's states from the saved one and runs the adjoint recurrence g_t = e_t + a_{t+1} * g_{t+1} as a
reverse scan (three-part elements, so that no tensor has to be shifted by one position).

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
def first_order_combine(a_early, u_early, a_late, u_late):
    """Composition of h -> a*h + u maps: the early one first."""
    return a_early * a_late, a_late * u_early + u_late


@triton.jit
def adjoint_combine(f_late, q_late, v_late, f_early, q_early, v_early):
    """Reverse-scan composition for g_t = e_t + a_{t+1} g_{t+1} over a segment [l, r] of positions.

    A segment is (F = a_l, Q = a_{l+1} ... a_r, V = its g_l when nothing flows in from after r); the reverse
    scan hands the later segment first.
    """
    bridge = q_early * f_late
    return f_early, bridge * q_late, v_early + bridge * v_late


@triton.jit
def _load_chunk(t, mask_t, offs_d, mask_d, offs_n, mask_n, pid_b,
                x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, A, dt_bias,
                stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                stride_zb, stride_zl, stride_rb, stride_rl,
                HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """The chunk's inputs in fp32: x, dt + dt_bias, delta, B, C, z (T, D or N), decay a and drive u (T, D, N).

    Positions past the end get a = 1 and u = 0, so the state passes through them unchanged.
    """
    mask_td = mask_t[:, None] & mask_d[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + t[:, None] * stride_xl + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dtb + t[:, None] * stride_dtl + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
    dt = dt + dt_bias[None, :]
    delta = softplus(dt)
    Bt = tl.load(B_ptr + pid_b * stride_Bb + t[:, None] * stride_Bl + offs_n[None, :], mask=mask_tn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * stride_Cb + t[:, None] * stride_Cl + offs_n[None, :], mask=mask_tn, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_zb + t[:, None] * stride_zl + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
    else:
        z = x
    a = tl.exp(delta[:, :, None] * A[None, :, :])
    keep = mask_t
    if HAS_RESET:
        flag = tl.load(reset_ptr + pid_b * stride_rb + t * stride_rl, mask=mask_t, other=0)
        a = tl.where((flag != 0)[:, None, None], 0.0, a)
    a = tl.where(keep[:, None, None], a, 1.0)
    u = (delta * x)[:, :, None] * Bt[:, None, :]
    return x, dt, delta, Bt, Ct, z, a, u


@triton.jit
def _scan_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, h0_ptr, reset_ptr,
                     y_ptr, final_ptr, chunk_states_ptr,
                     length, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                     SAVE_STATES: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] + offs_n[None, :] * d_inner  # states are stored (state index, channel)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    if HAS_H0:
        h = tl.load(h0_ptr + state_offset + dn, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    for chunk in range(0, n_chunks):
        if SAVE_STATES:
            tl.store(chunk_states_ptr + (pid_b * n_chunks + chunk) * d_inner * d_state + dn, h, mask=mask_dn)
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        x, dt, delta, Bt, Ct, z, a, u = _load_chunk(
            t, mask_t, offs_d, mask_d, offs_n, mask_n, pid_b, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
            A, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
            stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
        decay_from_start, drive_from_start = tl.associative_scan((a, u), 0, first_order_combine)
        hs = decay_from_start * h[None, :, :] + drive_from_start
        y = total(hs * Ct[:, None, :], axis=2) + Dskip[None, :] * x
        if HAS_Z:
            y = y * z * sigmoid(z)
        mask_td = mask_t[:, None] & mask_d[None, :]
        tl.store(y_ptr + (pid_b * length + t[:, None]) * d_inner + offs_d[None, :], y, mask=mask_td)
        h = total(tl.where((offs_t == BLOCK_T - 1)[:, None, None], hs, 0.0), axis=0)
    tl.store(final_ptr + state_offset + dn, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, reset_ptr,
                     chunk_states_ptr, dy_ptr, dfinal_ptr,
                     dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddt_bias_ptr, dh0_ptr, scratch_ptr,
                     length, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] + offs_n[None, :] * d_inner  # states are stored (state index, channel)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    # carry = a_s * g_s at the first position s after the chunk: what flows into the chunk's last state
    carry = tl.load(dfinal_ptr + state_offset + dn, mask=mask_dn, other=0.0).to(tl.float32)
    dA = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    dD = tl.full((BLOCK_D,), 0.0, tl.float32)
    ddt_bias = tl.full((BLOCK_D,), 0.0, tl.float32)
    n_chunks = (length + BLOCK_T - 1) // BLOCK_T
    for step in range(0, n_chunks):
        chunk = n_chunks - 1 - step
        t = chunk * BLOCK_T + offs_t
        mask_t = t < length
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        x, dt, delta, Bt, Ct, z, a, u = _load_chunk(
            t, mask_t, offs_d, mask_d, offs_n, mask_n, pid_b, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
            A, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
            stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
        h_start = tl.load(chunk_states_ptr + (pid_b * n_chunks + chunk) * d_inner * d_state + dn, mask=mask_dn, other=0.0)
        decay_from_start, drive_from_start = tl.associative_scan((a, u), 0, first_order_combine)
        hs = decay_from_start * h_start[None, :, :] + drive_from_start
        td = (pid_b * length + t[:, None]) * d_inner + offs_d[None, :]
        dy = tl.load(dy_ptr + td, mask=mask_td, other=0.0).to(tl.float32)
        if HAS_Z:
            y = total(hs * Ct[:, None, :], axis=2) + Dskip[None, :] * x
            sig = sigmoid(z)
            tl.store(dz_ptr + td, dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask_td)
            dy = dy * z * sig
        e = dy[:, :, None] * Ct[:, None, :]
        ones = tl.full(a.shape, 1.0, tl.float32)
        _, into_chunk_end, g_inside = tl.associative_scan((a, ones, e), 0, adjoint_combine, reverse=True)
        g = g_inside + into_chunk_end * carry[None, :, :]
        carry = total(tl.where((offs_t == 0)[:, None, None], a * g, 0.0), axis=0)
        # g * a_t * h_{t-1}, written as g * (h_t - u_t) so that h needs no shift by one position
        through_decay = tl.where(mask_t[:, None, None], g * (hs - u), 0.0)
        gB = total(g * Bt[:, None, :], axis=2)
        tl.store(dx_ptr + td, gB * delta + dy * Dskip[None, :], mask=mask_td)
        ddelta = gB * x + total(through_decay * A[None, :, :], axis=2)
        ddt = tl.where(mask_td, ddelta * sigmoid(dt), 0.0)
        tl.store(ddt_ptr + td, ddt, mask=mask_td)
        ddt_bias += total(ddt, axis=0)
        dD += total(dy * x, axis=0)
        dA += total(through_decay * delta[:, :, None], axis=0)
        tn = (pid_b * length + t[:, None]) * d_state + offs_n[None, :]
        tl.atomic_add(dB_ptr + tn, total(g * (delta * x)[:, :, None], axis=1), mask=mask_tn, sem="relaxed")
        tl.atomic_add(dC_ptr + tn, total(hs * dy[:, :, None], axis=1), mask=mask_tn, sem="relaxed")
    tl.store(dh0_ptr + state_offset + dn, carry, mask=mask_dn)
    tl.store(dA_ptr + state_offset + dn, dA, mask=mask_dn)
    tl.store(dD_ptr + pid_b * d_inner + offs_d, dD, mask=mask_d)
    tl.store(ddt_bias_ptr + pid_b * d_inner + offs_d, ddt_bias, mask=mask_d)


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
def _seq_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, h0_ptr, reset_ptr,
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
def _seq_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, reset_ptr,
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
    """Tile sizes: tiny ones under the interpreter (every scan element is a Python call there); on a GPU,
    narrower channel tiles when the batch is too small to give every multiprocessor a few programs."""
    block_n = max(2, triton.next_power_of_2(d_state))
    if interpreting():
        return dict(BLOCK_T=8, BLOCK_D=4, BLOCK_N=block_n)
    config = CONFIGS[DESIGN]
    block_d = min(config["BLOCK_D"], max(2, triton.next_power_of_2(d_inner)))
    programs_wanted = config["programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
    while block_d > config["min_block_d"] and batch * triton.cdiv(d_inner, block_d) < programs_wanted:
        block_d //= 2
    return dict(BLOCK_T=config["BLOCK_T"], BLOCK_D=block_d, BLOCK_N=block_n)


# GPU tile sizes (benchmarks/gpu.py --sweep times alternatives); the backward uses the forward's chunk
KERNELS = {"sequential": (_seq_fwd_kernel, _seq_bwd_kernel), "chunk-scan": (_scan_fwd_kernel, _scan_bwd_kernel)}
CONFIGS = {
    "sequential": dict(BLOCK_T=32, BLOCK_D=32, fwd_warps=1, bwd_warps=1, programs_per_sm=8, min_block_d=8),
    "chunk-scan": dict(BLOCK_T=16, BLOCK_D=8, fwd_warps=4, bwd_warps=4, programs_per_sm=2, min_block_d=4),
}
DESIGN = "sequential"


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
        forward_kernel, _ = KERNELS[DESIGN]
        forward_kernel[grid](
            x, dt, A, B, C, D, dt_bias, x if z is None else z, final if h0 is None else h0,
            x if reset_i8 is None else reset_i8, y, final, chunk_states, length, d_inner, d_state,
            *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C),
            *_row_strides(x if z is None else z), *(reset_i8.stride() if reset_i8 is not None else (0, 0)),
            HAS_Z=z is not None, HAS_H0=h0 is not None, HAS_RESET=reset is not None, SAVE_STATES=save,
            num_warps=CONFIGS[DESIGN]["fwd_warps"], **tiles)
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states)
            ctx.shapes = (tiles, initial_state is not None, DESIGN)
        return y, final.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states = ctx.saved_tensors
        tiles, has_h0, design = ctx.shapes
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
        # each program's recomputed chunk of states (sequential design)
        scratch = torch.empty(grid[0] * batch * tiles["BLOCK_T"] * tiles["BLOCK_N"] * tiles["BLOCK_D"],
                              device=x.device, dtype=torch.float32)
        _, backward_kernel = KERNELS[design]
        backward_kernel[grid](
            x, dt, A, B, C, D, dt_bias, x if z is None else z, x if reset_i8 is None else reset_i8,
            chunk_states, dy, dfinal, dx, ddt, dx if dz is None else dz, dB, dC, dA, dD, ddt_bias, dh0, scratch,
            length, d_inner, d_state,
            *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C),
            *_row_strides(x if z is None else z), *(reset_i8.stride() if reset_i8 is not None else (0, 0)),
            HAS_Z=z is not None, HAS_RESET=reset_i8 is not None, num_warps=CONFIGS[design]["bwd_warps"], **tiles)
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

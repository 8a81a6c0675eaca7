"""Triton kernels for the selective scan: same contract as ``selective_scan_ref`` (see ops.selective_scan).

One program owns BLOCK_D channels of one sequence (one warp, a channel per lane) and walks the sequence one
position at a time, its state (d_state, BLOCK_D) in registers with the state index inside each thread, so
the readout C . h needs no communication; softplus(dt + dt_bias), the D skip and the SiLU(z) gate are fused
and the next position's inputs are loaded before the current one is computed. The forward saves the state
every BLOCK_T positions (in bf16 when the inputs are bf16, half the memory). The backward walks those chunks
in reverse: it recomputes a chunk's states into this program's own scratch rows (read back by the same
threads, so no barrier), then runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} backwards through
the chunk. dB and dC sum over channels, so each program adds its lanes' share with one atomic per state
index and position.

Segments: a batch too small to fill the GPU (prefill at batch 1, training at batch 4 x 8K) would leave a few
hundred programs each walking the whole sequence, latency-bound. The sequence is then cut into segments run
as extra batch rows (programs address (sequence, first position), so strided inputs stay views). h_t is
linear in the state entering a segment, so the forward runs in three steps: a carry pass over every segment
from a zero state gives its end state and its decay (the product of a_t over it: exp(A * sum of delta), or 0
past a reset); a small kernel walks the segments of each sequence in order, h_in[s+1] = decay[s] * h_in[s] +
end[s], from h0; then the ordinary forward runs every segment from its h_in. The backward mirrors it: the
adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} is linear in the gradient entering a segment's end, so a light
reverse pass (no states needed) gives the gradient leaving each segment's start from zero, the same small
kernel carries dh_end[s-1] = start[s] + decay[s] * dh_end[s] backwards from the final state's gradient, and
the ordinary backward runs every segment from its dh_end. dA, dD and ddt_bias sum over segment rows as over
batch rows. Segmenting costs one more forward-shaped pass and one light backward pass; CONFIG says when.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it, on tiny tiles).
"""

from __future__ import annotations

import functools
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
    md = mask_d & (offs_d * 0 + t < length) & (offs_d * 0 + t >= 0)  # vector forms: the interpreter wants tensor masks
    mn = mask_n & (offs_n * 0 + t < length) & (offs_n * 0 + t >= 0)
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
def _segment(pid_b, length, seg_len, n_segs):
    """Segment row pid_b: its sequence, its first position and its number of positions."""
    row = pid_b // n_segs
    t0 = (pid_b - row * n_segs) * seg_len
    return row, t0, tl.minimum(seg_len, length - t0)


@triton.jit
def _state_tile(pid_d, d_inner, d_state, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program pid_d's channels and state indices, their masks, and its (N, D) state tile's mask and offsets
    (states are stored (state index, channel): channels contiguous)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    return offs_d, offs_n, mask_d, mask_n, mask_nd, offs_n[:, None] * d_inner + offs_d[None, :]


@triton.jit
def _at_position(t0, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                 stride_xl, stride_dtl, stride_Bl, stride_Cl, stride_zl, stride_rl):
    """The per-position input pointers moved to position t0 of their sequence."""
    return (x_ptr + t0 * stride_xl, dt_ptr + t0 * stride_dtl, B_ptr + t0 * stride_Bl, C_ptr + t0 * stride_Cl,
            z_ptr + t0 * stride_zl, reset_ptr + t0 * stride_rl)


@triton.jit
def _scan_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, h0_ptr, reset_ptr,
                     y_ptr, final_ptr, chunk_states_ptr, decay_ptr,
                     length, seg_len, n_segs, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr,
                     SAVE_STATES: tl.constexpr, CARRY_PASS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """State tile (N, D): the state index runs inside each thread, channels across threads.

    Program (channel tile, segment row) walks one segment; states, h0 and final are per segment row. The
    carry pass writes no y: only the segment's end state and its decay, the product of a_t over it.
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    row, t0, seg_length = _segment(pid_b, length, seg_len, n_segs)
    x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr = _at_position(t0, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                                                                 stride_xl, stride_dtl, stride_Bl, stride_Cl,
                                                                 stride_zl, stride_rl)
    y_ptr += (row * length + t0) * d_inner
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd = _state_tile(pid_d, d_inner, d_state, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    if HAS_H0:
        h = tl.load(h0_ptr + state_offset + nd, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        h = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    decay = tl.full((BLOCK_N, BLOCK_D), 1.0, tl.float32)
    chunks_per_row = (seg_len + BLOCK_T - 1) // BLOCK_T
    n_chunks = (seg_length + BLOCK_T - 1) // BLOCK_T
    x, dt, Bt, Ct, z, starts = _load_position(
        0, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, dt_bias,
        stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
        stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
    for chunk in range(0, n_chunks):
        if SAVE_STATES:
            tl.store(chunk_states_ptr + (pid_b * chunks_per_row + chunk) * d_inner * d_state + nd,
                     h.to(chunk_states_ptr.dtype.element_ty), mask=mask_nd)
        for t in range(chunk * BLOCK_T, tl.minimum(chunk * BLOCK_T + BLOCK_T, seg_length)):
            # the next position's loads are issued before this position's arithmetic
            x_next, dt_next, B_next, C_next, z_next, starts_next = _load_position(
                t + 1, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
                reset_ptr, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb,
                stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            h = a * h + (delta * x)[None, :] * Bt[:, None]
            if CARRY_PASS:
                decay = decay * a
            else:
                y = total(h * Ct[:, None], axis=0) + Dskip * x
                if HAS_Z:
                    y = y * z * sigmoid(z)
                tl.store(y_ptr + t * d_inner + offs_d, y, mask=mask_d)
            x, dt, Bt, Ct, z, starts = x_next, dt_next, B_next, C_next, z_next, starts_next
    tl.store(final_ptr + state_offset + nd, h, mask=mask_nd)
    if CARRY_PASS:
        tl.store(decay_ptr + state_offset + nd, decay, mask=mask_nd)


@triton.jit
def _then(decay_a, add_a, decay_b, add_b):
    """Two maps c -> decay * c + add, a then b, as one: c -> (decay_a decay_b) c + (decay_b add_a + add_b)."""
    return decay_a * decay_b, decay_b * add_a + add_b


@triton.jit
def _segment_carry_kernel(decay_ptr, local_ptr, first_ptr, carried_ptr, n_segs, size,
                          HAS_FIRST: tl.constexpr, REVERSE: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per sequence, over its segments in order (or reversed): carried[s] = c; c = decay[s] * c + local[s].

    Forward: c starts at h0 and carried[s] is segment s's initial state. Backward (reversed): c starts at
    the final state's gradient and carried[s] is the gradient reaching segment s's end. Each program takes
    BLOCK_E state elements of every segment at once and composes the segments' maps with a parallel scan:
    a walk from segment to segment waited on two loads per segment (139 us per layer for an 8K prefill).
    """
    pid_e = tl.program_id(0)
    row = tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < size
    order = tl.arange(0, BLOCK_S)  # the walk's order
    if REVERSE:
        seg = n_segs - 1 - order
    else:
        seg = order
    mask = (order < n_segs)[:, None] & mask_e[None, :]
    offsets = (row * n_segs + seg)[:, None] * size + offs_e[None, :]
    decay = tl.load(decay_ptr + offsets, mask=mask, other=1.0)
    local = tl.load(local_ptr + offsets, mask=mask, other=0.0)
    if HAS_FIRST:
        first = tl.load(first_ptr + row * size + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        first = tl.full((BLOCK_E,), 0.0, tl.float32)
    local = tl.where((order == 0)[:, None], decay * first[None, :] + local, local)
    _, after = tl.associative_scan((decay, local), 0, _then)  # c after each segment of the walk
    if REVERSE:  # what leaves a segment enters the next one of the walk; the walk's first gets ``first``
        seg_next, seg_first = seg - 1, n_segs - 1
    else:
        seg_next, seg_first = seg + 1, 0
    tl.store(carried_ptr + (row * n_segs + seg_next)[:, None] * size + offs_e[None, :], after,
             mask=(order + 1 < n_segs)[:, None] & mask_e[None, :])
    tl.store(carried_ptr + (row * n_segs + seg_first) * size + offs_e, first, mask=mask_e)


@triton.jit
def _load_adjoint_position(t, t0, offs_d, mask_d, offs_n, mask_n, row, length, dt_ptr, C_ptr, z_ptr, reset_ptr,
                           dy_ptr, dt_bias, d_inner, stride_dtb, stride_dtl, stride_Cb, stride_Cl, stride_zb,
                           stride_zl, stride_rb, stride_rl, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """What the adjoint needs of position t >= t0: delta (D,), C (N,), dy through the gate (D,), the reset flag."""
    md = mask_d & (offs_d * 0 + t >= t0)
    mn = mask_n & (offs_n * 0 + t >= t0)
    dt = tl.load(dt_ptr + row * stride_dtb + t * stride_dtl + offs_d, mask=md, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + row * stride_Cb + t * stride_Cl + offs_n, mask=mn, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + (row * length + t) * d_inner + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_zb + t * stride_zl + offs_d, mask=md, other=0.0).to(tl.float32)
        dy = dy * z * sigmoid(z)
    starts = False
    if HAS_RESET:
        starts = tl.load(reset_ptr + row * stride_rb + t * stride_rl + offs_n * 0, mask=mn, other=0) != 0
    return dt + dt_bias, Ct, dy, starts


@triton.jit
def _scan_bwd_carry_kernel(dt_ptr, A_ptr, C_ptr, dt_bias_ptr, z_ptr, reset_ptr, dy_ptr, dstart_ptr,
                           length, seg_len, n_segs, d_inner, d_state,
                           stride_dtb, stride_dtl, stride_Cb, stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl,
                           HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gradient leaving each segment's start when none enters at its end: g_t = C_t dy_t + a_{t+1} g_{t+1}
    backwards through the segment; the states are not needed."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    row, t0, seg_length = _segment(pid_b, length, seg_len, n_segs)
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd = _state_tile(pid_d, d_inner, d_state, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + nd, mask=mask_nd, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    flowing = tl.full((BLOCK_N, BLOCK_D), 0.0, tl.float32)
    dt, Ct, dy, starts = _load_adjoint_position(
        t0 + seg_length - 1, t0, offs_d, mask_d, offs_n, mask_n, row, length, dt_ptr, C_ptr, z_ptr, reset_ptr,
        dy_ptr, dt_bias, d_inner, stride_dtb, stride_dtl, stride_Cb, stride_Cl, stride_zb, stride_zl, stride_rb,
        stride_rl, HAS_Z, HAS_RESET)
    for back in range(0, seg_length):
        t = t0 + seg_length - 1 - back
        # the previous position's loads are issued before this position's arithmetic
        dt_next, C_next, dy_next, starts_next = _load_adjoint_position(
            t - 1, t0, offs_d, mask_d, offs_n, mask_n, row, length, dt_ptr, C_ptr, z_ptr, reset_ptr, dy_ptr,
            dt_bias, d_inner, stride_dtb, stride_dtl, stride_Cb, stride_Cl, stride_zb, stride_zl, stride_rb,
            stride_rl, HAS_Z, HAS_RESET)
        a = tl.exp(softplus(dt)[None, :] * A)
        if HAS_RESET:
            a = tl.where(starts[:, None], 0.0, a)
        flowing = a * (Ct[:, None] * dy[None, :] + flowing)
        dt, Ct, dy, starts = dt_next, C_next, dy_next, starts_next
    tl.store(dstart_ptr + pid_b * d_inner * d_state + nd, flowing, mask=mask_nd)


@triton.jit
def _load_dy(dy_ptr, first, t, t_min, d_inner, offs_d, mask_d):
    """The output gradient at position t >= t_min of the segment starting at row ``first`` of dy, in fp32."""
    md = mask_d & (offs_d * 0 + t >= t_min)
    return tl.load(dy_ptr + (first + t) * d_inner + offs_d, mask=md, other=0.0).to(tl.float32)


@triton.jit
def _scan_bwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, reset_ptr,
                     chunk_states_ptr, dy_ptr, dfinal_ptr,
                     dx_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddt_bias_ptr, dh0_ptr, scratch_ptr,
                     length, seg_len, n_segs, d_inner, d_state,
                     stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb, stride_Cl,
                     stride_zb, stride_zl, stride_rb, stride_rl,
                     HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunks in reverse: recompute the chunk's states into this program's scratch, then walk it backwards.

    Program (channel tile, segment row) as in the forward; dfinal, dh0, dA, dD and ddt_bias are per segment row.
    """
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    row, t0, seg_length = _segment(pid_b, length, seg_len, n_segs)
    x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr = _at_position(t0, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
                                                                 stride_xl, stride_dtl, stride_Bl, stride_Cl,
                                                                 stride_zl, stride_rl)
    first = row * length + t0  # the segment's first position among the batch * length rows of dy, dx, dB ...
    offs_d, offs_n, mask_d, mask_n, mask_nd, nd = _state_tile(pid_d, d_inner, d_state, BLOCK_D, BLOCK_N)
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
    chunks_per_row = (seg_len + BLOCK_T - 1) // BLOCK_T
    n_chunks = (seg_length + BLOCK_T - 1) // BLOCK_T
    for step in range(0, n_chunks):
        chunk = n_chunks - 1 - step
        start = chunk * BLOCK_T
        end = tl.minimum(start + BLOCK_T, seg_length)
        h = tl.load(chunk_states_ptr + (pid_b * chunks_per_row + chunk) * d_inner * d_state + nd, mask=mask_nd,
                    other=0.0).to(tl.float32)
        # each walk loads the position it visits next before this one's arithmetic (the loads' latency hidden:
        # B16 x L2048 training 129K -> 164K bytes/s on an H100)
        x, dt, Bt, Ct, z, starts = _load_position(
            start, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
            reset_ptr, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb,
            stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
        for t in range(start, end):
            x_next, dt_next, B_next, C_next, z_next, starts_next = _load_position(
                t + 1, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
                reset_ptr, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb,
                stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            h = a * h + (delta * x)[None, :] * Bt[:, None]
            tl.store(scratch + (t - start) * BLOCK_N * BLOCK_D + tile, h)  # read back by this same thread
            x, dt, Bt, Ct, z, starts = x_next, dt_next, B_next, C_next, z_next, starts_next
        x, dt, Bt, Ct, z, starts = _load_position(
            end - 1, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
            reset_ptr, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb,
            stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
        dy = _load_dy(dy_ptr, first, end - 1, 0, d_inner, offs_d, mask_d)
        h = tl.load(scratch + (end - 1 - start) * BLOCK_N * BLOCK_D + tile)
        for back in range(0, end - start):
            t = end - 1 - back
            # position t - 1: in this chunk's scratch, or (t == start) left for the next chunk
            x_next, dt_next, B_next, C_next, z_next, starts_next = _load_position(
                t - 1, offs_d, mask_d, offs_n, mask_n, row, seg_length, x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
                reset_ptr, dt_bias, stride_xb, stride_xl, stride_dtb, stride_dtl, stride_Bb, stride_Bl, stride_Cb,
                stride_Cl, stride_zb, stride_zl, stride_rb, stride_rl, HAS_Z, HAS_RESET)
            dy_next = _load_dy(dy_ptr, first, t - 1, start, d_inner, offs_d, mask_d)
            h_next = tl.load(scratch + (t - 1 - start) * BLOCK_N * BLOCK_D + tile,
                             mask=(tile * 0 + t - 1) >= start, other=0.0)
            delta = softplus(dt)
            a = tl.exp(delta[None, :] * A)
            if HAS_RESET:
                a = tl.where(starts[:, None], 0.0, a)
            u = (delta * x)[None, :] * Bt[:, None]
            if HAS_Z:
                y = total(h * Ct[:, None], axis=0) + Dskip * x
                sig = sigmoid(z)
                tl.store(dz_ptr + (first + t) * d_inner + offs_d, dy * y * sig * (1.0 + z * (1.0 - sig)),
                         mask=mask_d)
                dy = dy * z * sig
            g = Ct[:, None] * dy[None, :] + flowing
            # g * a_t * h_{t-1}, written as g * (h_t - u_t): no earlier state needed
            through_decay = g * (h - u)
            gB = total(g * Bt[:, None], axis=0)
            tl.store(dx_ptr + (first + t) * d_inner + offs_d, gB * delta + dy * Dskip, mask=mask_d)
            ddt = (gB * x + total(through_decay * A, axis=0)) * sigmoid(dt)
            tl.store(ddt_ptr + (first + t) * d_inner + offs_d, ddt, mask=mask_d)
            ddt_bias += tl.where(mask_d, ddt, 0.0)
            dD += dy * x
            dA += through_decay * delta[None, :]
            tn = (first + t) * d_state + offs_n
            tl.atomic_add(dB_ptr + tn, total(g * (delta * x)[None, :], axis=1), mask=mask_n, sem="relaxed")
            tl.atomic_add(dC_ptr + tn, total(h * dy[None, :], axis=1), mask=mask_n, sem="relaxed")
            flowing = a * g
            x, dt, Bt, Ct, z, starts, dy, h = x_next, dt_next, B_next, C_next, z_next, starts_next, dy_next, h_next
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
    programs_wanted = CONFIG["programs_per_sm"] * multiprocessors(device)
    while block_d > CONFIG["min_block_d"] and batch * triton.cdiv(d_inner, block_d) < programs_wanted:
        block_d //= 2
    return dict(BLOCK_T=CONFIG["BLOCK_T"], BLOCK_D=block_d, BLOCK_N=block_n)


def _segment_length(length: int, programs: int, multiprocessors: int, block_t: int) -> int:
    """Positions per segment (the last one may be shorter): the whole sequence unless ``programs`` (batch x
    channel tiles) leave the GPU short, else the fewest power-of-2 segments that reach
    CONFIG["segment_programs_per_sm"] programs per multiprocessor, each at least CONFIG["min_segment"] long
    and rounded up to a multiple of BLOCK_T."""
    programs_wanted = CONFIG["segment_programs_per_sm"] * multiprocessors
    n_segs = 1
    while programs * n_segs < programs_wanted and length // (2 * n_segs) >= CONFIG["min_segment"]:
        n_segs *= 2
    if n_segs == 1:
        return length
    return triton.cdiv(triton.cdiv(length, n_segs), block_t) * block_t


# GPU tiles, the fastest of benchmarks/gpu.py --sweep on an H100: BLOCK_T is the chunk between saved states
# (and the backward's recompute window); one warp of 32 channels keeps every reduction over d_state in-thread.
# Segments (see the module docstring) start when batch x channel tiles < segment_programs_per_sm x SMs and
# stop at min_segment positions; a min_segment above the longest sequence turns them off.
# benchmarks/gpu.py --sweep-segments on an H100 (bench-91m): full-warp channel tiles plus segments beat narrower
# tiles (B4 x L8192 training 68K -> 141K bytes/s, B16 x L2048 107K -> 142K, 8K prefill 219K -> 295K).
# benchmarks/gpu.py --sweep-scan on an H100 (session 4): narrower backward tiles lose although they take fewer
# registers (16 channels: 141 instead of 254 per thread; training 129K -> 80K bytes/s), so both directions
# share BLOCK_D. bf16_states: saved chunk states in bf16 for bf16 inputs: 2.4 GB less at B4 x L8192 (23.0 vs
# 25.4 GB), training 4% slower (129K vs 134K bytes/s at B16 x L2048). carry_elements: the segments' carry
# kernel's tile (segments x state elements), carry_warps its warps.
CONFIG = dict(BLOCK_T=16, BLOCK_D=32, fwd_warps=1, bwd_warps=1, programs_per_sm=8, min_block_d=32,
              segment_programs_per_sm=32, min_segment=64, carry_warps=4, carry_elements=4096, bf16_states=True)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (cached: asked at every launch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def as_int8(flags: Tensor) -> Tensor:
    """Bool flags as the int8 the kernels read: a view where possible (no copy, no kernel launch)."""
    return flags.view(torch.int8) if flags.dtype == torch.bool else flags.to(torch.int8)


def _row_strides(t: Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _rows_contiguous(t: Tensor) -> Tensor:
    """A (batch, length, channels) tensor whose last dim is contiguous (views of in_proj output stay views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _carry_across_segments(decay: Tensor, local: Tensor, first: Tensor | None, n_segs: int,
                           reverse: bool) -> Tensor:
    """carried (batch * n_segs, d_state, d_inner): what enters each segment from the ones before it (after it
    when reverse); decay, local (batch * n_segs, d_state, d_inner); first (batch, d_state, d_inner) or None."""
    rows, d_state, d_inner = local.shape
    size = d_state * d_inner
    carried = torch.empty_like(local)
    block_s = max(2, triton.next_power_of_2(n_segs))
    block_e = min(triton.next_power_of_2(size), max(16, CONFIG["carry_elements"] // block_s))
    _segment_carry_kernel[(triton.cdiv(size, block_e), rows // n_segs)](
        decay, local, local if first is None else first, carried, n_segs, size,
        HAS_FIRST=first is not None, REVERSE=reverse, num_warps=CONFIG["carry_warps"],
        BLOCK_S=block_s, BLOCK_E=block_e)
    return carried


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, z, initial_state, reset, segments):
        x, dt, B, C = map(_rows_contiguous, (x, dt, B, C))
        z = None if z is None else _rows_contiguous(z)
        batch, length, d_inner = x.shape
        d_state = A.shape[1]
        tiles = _tiles(batch, d_inner, d_state, x.device)
        if segments is not None:
            seg_len = triton.cdiv(length, max(1, min(segments, length)))
        elif interpreting():
            seg_len = length
        else:
            seg_len = _segment_length(length, batch * triton.cdiv(d_inner, tiles["BLOCK_D"]),
                                      multiprocessors(x.device),
                                      tiles["BLOCK_T"])
        n_segs = triton.cdiv(length, seg_len)
        rows = batch * n_segs  # one row of programs per segment
        # the kernels keep states and A as (d_state, d_inner): channels contiguous; D and dt_bias in any dtype
        A, D, dt_bias = A.float().t().contiguous(), D.contiguous(), dt_bias.contiguous()
        h0 = None if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
        reset_i8 = None if reset is None else as_int8(reset)
        save = any(ctx.needs_input_grad)
        y = torch.empty(batch, length, d_inner, device=x.device, dtype=x.dtype)
        ends = torch.empty(rows, d_state, d_inner, device=x.device, dtype=torch.float32)
        # the states the backward restarts from, kept in the inputs' precision (bf16 training: half the memory)
        bf16_states = x.dtype == torch.bfloat16 and CONFIG["bf16_states"]
        chunk_states = torch.empty(rows, triton.cdiv(seg_len, tiles["BLOCK_T"]) if save else 0, d_state, d_inner,
                                   device=x.device, dtype=torch.bfloat16 if bf16_states else torch.float32)
        decay = torch.empty_like(ends) if n_segs > 1 else None  # per segment: the product of a_t over it
        grid = (triton.cdiv(d_inner, tiles["BLOCK_D"]), rows)
        z_arg = x if z is None else z
        reset_arg = x if reset_i8 is None else reset_i8

        def scan(h_init, carry_pass):
            _scan_fwd_kernel[grid](
                x, dt, A, B, C, D, dt_bias, z_arg, ends if h_init is None else h_init, reset_arg,
                y, ends, chunk_states, ends if decay is None else decay, length, seg_len, n_segs, d_inner, d_state,
                *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C), *_row_strides(z_arg),
                *(reset_i8.stride() if reset_i8 is not None else (0, 0)),
                HAS_Z=z is not None, HAS_H0=h_init is not None, HAS_RESET=reset is not None,
                SAVE_STATES=save and not carry_pass, CARRY_PASS=carry_pass,
                num_warps=CONFIG["fwd_warps"], **tiles)

        if n_segs > 1:  # each segment's end state from zero, then the true initial state of every segment
            scan(None, carry_pass=True)
            h0 = _carry_across_segments(decay, ends, h0, n_segs, reverse=False)
        scan(h0, carry_pass=False)
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states, decay)
            ctx.shapes = (tiles, seg_len, initial_state is not None)
        final = ends.view(batch, n_segs, d_state, d_inner)[:, -1]
        return y, final.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, dt_bias, z, reset_i8, chunk_states, decay = ctx.saved_tensors
        tiles, seg_len, has_h0 = ctx.shapes
        batch, length, d_inner = x.shape
        d_state = A.shape[0]
        n_segs = triton.cdiv(length, seg_len)
        rows = batch * n_segs
        dy = dy.contiguous()
        dfinal = dfinal.float().transpose(1, 2).contiguous()
        z_arg = x if z is None else z
        reset_arg = x if reset_i8 is None else reset_i8
        reset_strides = reset_i8.stride() if reset_i8 is not None else (0, 0)
        grid = (triton.cdiv(d_inner, tiles["BLOCK_D"]), rows)
        if n_segs > 1:  # the gradient leaving each segment's start, then the true gradient at every segment's end
            dstarts = torch.empty(rows, d_state, d_inner, device=x.device, dtype=torch.float32)
            _scan_bwd_carry_kernel[grid](
                dt, A, C, dt_bias, z_arg, reset_arg, dy, dstarts, length, seg_len, n_segs, d_inner, d_state,
                *_row_strides(dt), *_row_strides(C), *_row_strides(z_arg), *reset_strides,
                HAS_Z=z is not None, HAS_RESET=reset_i8 is not None, num_warps=CONFIG["bwd_warps"],
                BLOCK_D=tiles["BLOCK_D"], BLOCK_N=tiles["BLOCK_N"])
            dfinal = _carry_across_segments(decay, dstarts, dfinal, n_segs, reverse=True)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        ddt = torch.empty_like(dt, memory_format=torch.contiguous_format)
        dz = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
        dB = torch.zeros(batch, length, d_state, device=x.device, dtype=torch.float32)
        dC = torch.zeros(batch, length, d_state, device=x.device, dtype=torch.float32)
        dA = torch.empty(rows, d_state, d_inner, device=x.device, dtype=torch.float32)
        dD = torch.empty(rows, d_inner, device=x.device, dtype=torch.float32)
        ddt_bias = torch.empty(rows, d_inner, device=x.device, dtype=torch.float32)
        dh0 = torch.empty(rows, d_state, d_inner, device=x.device, dtype=torch.float32)
        # each program's recomputed chunk of states
        scratch = torch.empty(grid[0] * rows * tiles["BLOCK_T"] * tiles["BLOCK_N"] * tiles["BLOCK_D"],
                              device=x.device, dtype=torch.float32)
        _scan_bwd_kernel[grid](
            x, dt, A, B, C, D, dt_bias, z_arg, reset_arg,
            chunk_states, dy, dfinal, dx, ddt, dx if dz is None else dz, dB, dC, dA, dD, ddt_bias, dh0, scratch,
            length, seg_len, n_segs, d_inner, d_state,
            *_row_strides(x), *_row_strides(dt), *_row_strides(B), *_row_strides(C), *_row_strides(z_arg),
            *reset_strides, HAS_Z=z is not None, HAS_RESET=reset_i8 is not None, num_warps=CONFIG["bwd_warps"], **tiles)
        dh0 = dh0.view(batch, n_segs, d_state, d_inner)[:, 0]
        return (dx, ddt, dA.sum(0).t(), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0), ddt_bias.sum(0), dz,
                dh0.transpose(1, 2) if has_h0 else None, None, None)


def selective_scan_triton(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
    segments: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton scan: same contract and results as ``selective_scan_ref`` (y in x's dtype, final state fp32).

    ``segments`` (>= 1) forces segments of cdiv(length, segments) positions (fewer segments when that does
    not divide evenly); by default ``_segment_length`` decides on a GPU, and the interpreter uses one.
    """
    if not (x.is_cuda or interpreting()):
        raise UserError("the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if x.shape[1] == 0:
        from mambabyte.ops.selective_scan import selective_scan_ref

        return selective_scan_ref(x, dt, A, B, C, D, dt_bias, z=z, initial_state=initial_state, reset=reset)
    return _SelectiveScanTriton.apply(x, dt, A, B, C, D, dt_bias, z, initial_state, reset, segments)

"""Triton kernels for the causal depthwise conv1d: same contract as ``ops.causal_conv.causal_conv1d``.

out_t = bias + sum_j weight[:, K-1-j] * x_{t-j}, where x_{t-j} counts only when no document starts in
(t-j, t] (a ``reset`` there), and positions before the sequence come from ``conv_state``. One program
computes a (BLOCK_T, BLOCK_D) tile of outputs in fp32; the backward computes the input gradient of a tile
and its share of the weight and bias gradients. The carried window (batch, channels, K-1) is a few
positions, sliced in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mambabyte.ops.triton_scan import as_int8, interpreting, sigmoid, total


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, reset_ptr, out_ptr, length, channels,
                     stride_xb, stride_xl, stride_rb, stride_rl,
                     KERNEL: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = t < length
    mask_d = d < channels
    acc = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :] + tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
    valid = mask_t  # the input at t - j still belongs to position t's document
    for j in tl.static_range(KERNEL):
        s = t - j
        if HAS_RESET and j > 0:
            flag = tl.load(reset_ptr + pid_b * stride_rb + (s + 1) * stride_rl, mask=mask_t & (s + 1 >= 0), other=0)
            valid = valid & (flag == 0)
        w = tl.load(w_ptr + d * KERNEL + (KERNEL - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        in_seq = (valid & (s >= 0))[:, None] & mask_d[None, :]
        xs = tl.load(x_ptr + pid_b * stride_xb + s[:, None] * stride_xl + d[None, :], mask=in_seq, other=0.0).to(tl.float32)
        if HAS_STATE:
            in_state = (valid & (s < 0))[:, None] & mask_d[None, :]
            xs += tl.load(state_ptr + (pid_b * channels + d[None, :]) * (KERNEL - 1) + (s[:, None] + KERNEL - 1),
                          mask=in_state, other=0.0).to(tl.float32)
        acc += w[None, :] * xs
    if SILU:
        acc = acc * sigmoid(acc)
    tl.store(out_ptr + (pid_b * length + t[:, None]) * channels + d[None, :], acc,
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, state_ptr, reset_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, length, channels,
                     stride_xb, stride_xl, stride_rb, stride_rl,
                     KERNEL: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = p < length
    mask_d = d < channels
    mask_pd = mask_p[:, None] & mask_d[None, :]
    dout = tl.load(dout_ptr + (pid_b * length + p[:, None]) * channels + d[None, :], mask=mask_pd, other=0.0).to(tl.float32)
    # weight and bias: position p as an output, the input at p - j
    partial = (pid_b * tl.num_programs(0) + pid_t) * (KERNEL + 1) * channels
    tl.store(dbias_ptr + partial + d, total(dout, axis=0), mask=mask_d)
    valid = mask_p
    for j in tl.static_range(KERNEL):
        s = p - j
        if HAS_RESET and j > 0:
            flag = tl.load(reset_ptr + pid_b * stride_rb + (s + 1) * stride_rl, mask=mask_p & (s + 1 >= 0), other=0)
            valid = valid & (flag == 0)
        in_seq = (valid & (s >= 0))[:, None] & mask_d[None, :]
        xs = tl.load(x_ptr + pid_b * stride_xb + s[:, None] * stride_xl + d[None, :], mask=in_seq, other=0.0).to(tl.float32)
        if HAS_STATE:
            in_state = (valid & (s < 0))[:, None] & mask_d[None, :]
            xs += tl.load(state_ptr + (pid_b * channels + d[None, :]) * (KERNEL - 1) + (s[:, None] + KERNEL - 1),
                          mask=in_state, other=0.0).to(tl.float32)
        tl.store(dw_ptr + partial + (KERNEL - 1 - j) * channels + channels + d, total(dout * xs, axis=0), mask=mask_d)
    # input: position p as an input, the output at p + j
    dx = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
    valid = mask_p
    for j in tl.static_range(KERNEL):
        t = p + j
        if HAS_RESET and j > 0:
            flag = tl.load(reset_ptr + pid_b * stride_rb + t * stride_rl, mask=mask_p & (t < length), other=0)
            valid = valid & (flag == 0)
        w = tl.load(w_ptr + d * KERNEL + (KERNEL - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        g = tl.load(dout_ptr + (pid_b * length + t[:, None]) * channels + d[None, :],
                    mask=(valid & (t < length))[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        dx += w[None, :] * g
    tl.store(dx_ptr + (pid_b * length + p[:, None]) * channels + d[None, :], dx, mask=mask_pd)


def _tiles(length: int) -> dict:
    if interpreting():
        return dict(BLOCK_T=8, BLOCK_D=4)
    return dict(BLOCK_T=64 if length >= 64 else max(2, triton.next_power_of_2(length)), BLOCK_D=128)


def _reset_args(reset: Tensor | None, x: Tensor) -> tuple[Tensor, int, int]:
    return (x, 0, 0) if reset is None else (reset, *reset.stride())


def _conv_forward(x: Tensor, weight: Tensor, bias: Tensor, conv_state: Tensor | None, reset_i8: Tensor | None,
                  silu: bool) -> Tensor:
    """The conv's output (batch, length, channels) in x's dtype, SiLU applied in the kernel if ``silu``."""
    batch, length, channels = x.shape
    tiles = _tiles(length)
    out = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(length, tiles["BLOCK_T"]), triton.cdiv(channels, tiles["BLOCK_D"]), batch)
    reset_arg, stride_rb, stride_rl = _reset_args(reset_i8, x)
    _conv_fwd_kernel[grid](x, weight, bias, x if conv_state is None else conv_state, reset_arg, out, length, channels,
                           x.stride(0), x.stride(1), stride_rb, stride_rl, KERNEL=weight.shape[-1],
                           HAS_STATE=conv_state is not None, HAS_RESET=reset_i8 is not None, SILU=silu, **tiles)
    return out


class _CausalConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, reset_i8):
        ctx.save_for_backward(x, weight, conv_state, reset_i8)
        ctx.tiles = _tiles(x.shape[1])
        return _conv_forward(x, weight, bias, conv_state, reset_i8, silu=False)

    @staticmethod
    def backward(ctx, dout):
        x, weight, conv_state, reset_i8 = ctx.saved_tensors
        batch, length, channels = x.shape
        kernel = weight.shape[-1]
        tiles = ctx.tiles
        dout = dout.contiguous()
        dx = torch.empty(batch, length, channels, device=x.device, dtype=x.dtype)
        n_tiles = triton.cdiv(length, tiles["BLOCK_T"])
        # per tile: the bias gradient, then one row per weight tap
        partials = torch.empty(batch, n_tiles, kernel + 1, channels, device=x.device, dtype=torch.float32)
        grid = (n_tiles, triton.cdiv(channels, tiles["BLOCK_D"]), batch)
        reset_arg, stride_rb, stride_rl = _reset_args(reset_i8, x)
        _conv_bwd_kernel[grid](x, weight, x if conv_state is None else conv_state, reset_arg, dout, dx, partials, partials,
                               length, channels, x.stride(0), x.stride(1), stride_rb, stride_rl, KERNEL=kernel,
                               HAS_STATE=conv_state is not None, HAS_RESET=reset_i8 is not None, **tiles)
        sums = partials.sum((0, 1))
        dstate = None
        if conv_state is not None and ctx.needs_input_grad[3]:
            dstate = _state_grad(weight, dout, reset_i8, kernel).to(conv_state.dtype)
        return dx, sums[1:].t(), sums[0], dstate, None


def _state_grad(weight: Tensor, dout: Tensor, reset_i8: Tensor | None, kernel: int) -> Tensor:
    """Gradient of the carried window: its slot j (input position j - (K-1)) feeds outputs 0 .. j."""
    batch, length, channels = dout.shape
    reaches = torch.ones(batch, length, device=dout.device, dtype=torch.bool)
    if reset_i8 is not None:  # a prefix input reaches output t only if no document starts in [0, t]
        reaches = reset_i8.cumsum(1) == 0
    dstate = dout.new_zeros(batch, channels, kernel - 1, dtype=torch.float32)
    for j in range(kernel - 1):
        for t in range(min(j, length - 1) + 1):
            dstate[:, :, j] += weight[:, j - t].float() * dout[:, t].float() * reaches[:, t, None]
    return dstate


def _carried_window(x: Tensor, prefix: Tensor, reset: Tensor | None, kernel: int) -> Tensor:
    """The last K-1 inputs (batch, channels, K-1), zero where an earlier document ends before the last position."""
    batch, length, _ = x.shape
    window = torch.cat([prefix, x[:, max(0, length - (kernel - 1)):]], dim=1)[:, -(kernel - 1):]
    if reset is not None and kernel > 2:
        # slot j holds position length - (K-1) + j: a document starting at any later position drops it, so only
        # the last K-2 flags matter (a few small kernels per layer whatever the length)
        later = reset[:, max(0, length - (kernel - 2)):]
        if later.shape[1] < kernel - 2:  # fewer positions than slots: none before the first
            later = torch.cat([later.new_zeros(batch, kernel - 2 - later.shape[1]), later], dim=1)
        starts_after = later.flip(1).cumsum(1).flip(1)  # [:, j]: documents starting after slot j
        keep = torch.cat([starts_after == 0, later.new_ones(batch, 1)], dim=1)
        window = window * keep.unsqueeze(-1).to(x.dtype)
    return window.transpose(1, 2).contiguous()


def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Tensor, conv_state: Tensor | None = None,
                         reset: Tensor | None = None, silu: bool = False) -> tuple[Tensor, Tensor]:
    """Returns (out (batch, length, channels) in x's dtype, the next conv_state (batch, channels, K-1)); with
    ``silu`` out is SiLU(conv): in the kernel when no gradient is recorded, else by F.silu on the output."""
    batch, length, channels = x.shape
    kernel = weight.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    state = None if conv_state is None else conv_state.to(x.dtype).contiguous()
    reset_i8 = None if reset is None else as_int8(reset)
    weight = weight.reshape(channels, kernel)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, state))
    if not length:
        out = x.clone()
    elif recording:
        out = _CausalConvTriton.apply(x, weight, bias, state, reset_i8)
        out = F.silu(out) if silu else out
    else:
        out = _conv_forward(x, weight, bias, state, reset_i8, silu)
    prefix = x.new_zeros(batch, kernel - 1, channels) if state is None else state.transpose(1, 2)
    return out, _carried_window(x, prefix, reset, kernel)

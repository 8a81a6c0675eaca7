"""Causal depthwise conv1d over (batch, length, channels), with a carried window and document resets.

out_t = bias + sum_k weight[:, k] * x_{t - (K-1) + k}, where inputs before the sequence come from
``conv_state`` (batch, channels, K-1) and an input from an earlier document than position t counts as 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _segments(reset: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """Document index of every position, and the same left-padded with the prefix's index (0)."""
    seg = torch.cumsum(reset.long(), dim=1)
    return seg, torch.cat([seg.new_zeros(seg.shape[0], prefix), seg], dim=1)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor, conv_state: Tensor | None = None, reset: Tensor | None = None,
    silu: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns (out (batch, length, channels), the next conv_state (batch, channels, K-1)); ``silu``: out is
    SiLU(conv) (fused into the kernel where nothing needs gradients).

    CUDA tensors go to the Triton kernels (ops.triton_conv) where Triton is installed."""
    from mambabyte.ops.dispatch import TRITON_RUNS

    if x.is_cuda and TRITON_RUNS:
        from mambabyte.ops.triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, conv_state, reset, silu)
    batch, length, channels = x.shape
    kernel = weight.shape[-1]
    weight = weight.reshape(channels, kernel)
    if conv_state is None:
        prefix = x.new_zeros(batch, kernel - 1, channels)
    else:
        prefix = conv_state.transpose(1, 2).to(x.dtype)
    padded = torch.cat([prefix, x], dim=1)
    if reset is not None:
        seg, seg_padded = _segments(reset, kernel - 1)
    out = bias.to(x.dtype).expand(batch, length, channels)
    for k in range(kernel):
        tap = padded[:, k : k + length] * weight[:, k].to(x.dtype)
        if reset is not None and k < kernel - 1:
            tap = tap * (seg_padded[:, k : k + length] == seg).unsqueeze(-1).to(x.dtype)
        out = out + tap
    window = padded[:, padded.shape[1] - (kernel - 1) :]
    if reset is not None:
        window = window * (seg_padded[:, -(kernel - 1) :] == seg[:, -1:]).unsqueeze(-1).to(x.dtype)
    return F.silu(out) if silu else out, window.transpose(1, 2).contiguous()


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
    """One position: x (batch, channels) -> (out (batch, channels), next conv_state)."""
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)
    out = (window * weight.reshape(window.shape[1], -1)).sum(-1) + bias
    return out, window[:, :, 1:]

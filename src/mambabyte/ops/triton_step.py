"""One decoding position of the selective scan as a single Triton kernel (softplus, update, readout, gate).

Same contract as ``ops.dispatch.selective_step_torch``: x, dt, z (batch, d_inner); B, C (batch, d_state);
state (batch, d_inner, d_state) fp32 -> (y in x's dtype, next state fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambabyte.ops.triton_scan import interpreting, sigmoid, softplus, total


@triton.jit
def _step_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, state_ptr, y_ptr, next_ptr,
                 d_inner, d_state, stride_xb, stride_dtb, stride_Bb, stride_Cb, stride_zb,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d_inner
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * d_state + offs_n[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dtb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + pid_b * stride_zb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + pid_b * stride_Bb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + pid_b * stride_Cb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offset = pid_b * d_inner * d_state
    h = tl.load(state_ptr + state_offset + dn, mask=mask_dn, other=0.0)
    delta = softplus(dt + dt_bias)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bt[None, :]
    y = (total(h * Ct[None, :], axis=1) + Dskip * x) * z * sigmoid(z)
    tl.store(next_ptr + state_offset + dn, h, mask=mask_dn)
    tl.store(y_ptr + pid_b * d_inner + offs_d, y, mask=mask_d)


def selective_step_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                          z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """(y (batch, d_inner) in x's dtype, next state (batch, d_inner, d_state) fp32); no autograd."""
    batch, d_inner = x.shape
    d_state = A.shape[1]
    x, dt, z, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, z, B, C))
    state = state.float().contiguous()
    block_d = 4 if interpreting() else 64
    block_n = max(2, triton.next_power_of_2(d_state))
    y = torch.empty(batch, d_inner, device=x.device, dtype=x.dtype)
    next_state = torch.empty_like(state)
    grid = (batch, triton.cdiv(d_inner, block_d))
    _step_kernel[grid](x, dt, A.float().contiguous(), B, C, D.float().contiguous(), dt_bias.float().contiguous(), z,
                       state, y, next_state, d_inner, d_state, x.stride(0), dt.stride(0), B.stride(0), C.stride(0),
                       z.stride(0), BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4)
    return y, next_state

"""The selective scan of Mamba-1 and its pure-PyTorch backends.

For every channel d and state index n, with delta = softplus(dt + dt_bias):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t        (h_{-1} = initial_state)
    y_t = C_t . h_t + D * x_t,   then   y_t * silu(z_t) when z is given

A position whose ``reset`` flag is set starts from a zero state (documents packed in one window do not
see each other). Shapes: x, dt, z (batch, length, d_inner); B, C (batch, length, d_state);
A (d_inner, d_state); D, dt_bias (d_inner,); states (batch, d_inner, d_state); reset (batch, length) bool.

``selective_scan_ref`` is the sequential ground truth; ``selective_scan_chunked`` computes the same
recurrence as a two-level chunked scan (about 2*sqrt(length) vectorised steps) with a hand-written
backward, which is what makes training on a CPU fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _discretize(x, dt, A, B, dt_bias, reset):
    """delta, the decay exp(delta*A) and the input delta*B*x, all in fp32, (batch, length, d_inner, d_state)."""
    delta = F.softplus(dt.float() + dt_bias.float())
    decay = torch.exp(delta.unsqueeze(-1) * A.float())
    if reset is not None:
        decay = decay * (~reset).to(decay.dtype)[:, :, None, None]
    drive = (delta * x.float()).unsqueeze(-1) * B.float().unsqueeze(2)
    return decay, drive


def _readout(h, x, C, D, z):
    """y = C . h + D * x, gated by silu(z); computed in fp32."""
    return skip_and_gate(torch.einsum("bldn,bln->bld", h, C.float()), x, D, z)


def skip_and_gate(y: Tensor, x: Tensor, D: Tensor, z: Tensor | None) -> Tensor:
    """The readout's last part, in fp32: (y + D * x) * silu(z), or y + D * x without z."""
    y = y + D.float() * x.float()
    return y if z is None else y * F.silu(z.float())


def selective_scan_ref(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sequential reference: returns (y in x's dtype, final state in fp32)."""
    decay, drive = _discretize(x, dt, A, B, dt_bias, reset)
    batch, length, d_inner, d_state = decay.shape
    h = x.new_zeros(batch, d_inner, d_state, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = []
    for t in range(length):
        h = decay[:, t] * h + drive[:, t]
        states.append(h)
    hs = torch.stack(states, dim=1) if states else decay.new_zeros(batch, 0, d_inner, d_state)
    return _readout(hs, x, C, D, z).to(x.dtype), h


def _chunk_size(length: int) -> int:
    return max(4, int(math.sqrt(length)))


def linear_scan_forward(decay: Tensor, drive: Tensor, h0: Tensor) -> Tensor:
    """All states of h_t = decay_t * h_{t-1} + drive_t over dim 1, without autograd.

    Two levels: a scan inside every chunk (all chunks at once), then a short scan of the chunk carries,
    then each position adds its carry times the decay accumulated since the chunk began.
    """
    batch, length = decay.shape[:2]
    rest = decay.shape[2:]
    if length == 0:
        return drive.clone()
    size = _chunk_size(length)
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    if pad:
        decay = torch.cat([decay, decay.new_ones(batch, pad, *rest)], dim=1)
        drive = torch.cat([drive, drive.new_zeros(batch, pad, *rest)], dim=1)
    a = decay.view(batch, n_chunks, size, *rest)
    h = drive.view(batch, n_chunks, size, *rest).clone()
    a_cum = a.clone()
    for t in range(1, size):
        h[:, :, t].addcmul_(a[:, :, t], h[:, :, t - 1])
        a_cum[:, :, t].mul_(a_cum[:, :, t - 1])
    carry = h0
    carries = torch.empty_like(h[:, :, 0])
    for c in range(n_chunks):
        carries[:, c] = carry
        carry = a_cum[:, c, -1] * carry + h[:, c, -1]
    h.addcmul_(a_cum, carries.unsqueeze(2))
    return h.view(batch, n_chunks * size, *rest)[:, :length]


class _LinearScan(torch.autograd.Function):
    """h_t = decay_t * h_{t-1} + drive_t with a chunked forward and a chunked reverse-scan backward."""

    @staticmethod
    def forward(ctx, decay: Tensor, drive: Tensor, h0: Tensor) -> Tensor:
        h = linear_scan_forward(decay, drive, h0)
        ctx.save_for_backward(decay, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        decay, h, h0 = ctx.saved_tensors
        # g_t = dL/dh_t in total = grad_h_t + decay_{t+1} * g_{t+1}: the same scan, run backwards in time
        shifted = torch.cat([decay[:, 1:], decay.new_zeros(decay[:, :1].shape)], dim=1)
        g = linear_scan_forward(shifted.flip(1), grad_h.flip(1), torch.zeros_like(h0)).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        grad_decay = g * h_prev
        grad_h0 = decay[:, 0] * g[:, 0] if decay.shape[1] else torch.zeros_like(h0)
        return grad_decay, g, grad_h0


def selective_scan_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked parallel scan: same contract and results as ``selective_scan_ref``."""
    decay, drive = _discretize(x, dt, A, B, dt_bias, reset)
    batch, length, d_inner, d_state = decay.shape
    h0 = decay.new_zeros(batch, d_inner, d_state) if initial_state is None else initial_state.float()
    hs = _LinearScan.apply(decay, drive, h0)
    final = hs[:, -1] if length else h0
    return _readout(hs, x, C, D, z).to(x.dtype), final

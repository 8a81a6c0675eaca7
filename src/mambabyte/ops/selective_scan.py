"""The selective scan of Mamba-1 and its pure-PyTorch backends.

For every channel d and state index n, with delta = softplus(dt + dt_bias):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t        (h_{-1} = initial_state)
    y_t = C_t . h_t + D * x_t,   then   y_t * silu(z_t) when z is given

A position whose ``reset`` flag is set starts from a zero state (documents packed in one window do not
see each other). Shapes: x, dt, z (batch, length, d_inner); B, C (batch, length, d_state);
A (d_inner, d_state); D, dt_bias (d_inner,); states (batch, d_inner, d_state); reset (batch, length) bool.

``selective_scan_ref`` is the sequential ground truth; ``selective_scan_chunked`` computes the same
recurrence block by block in time, each block as a two-level chunked scan (about 2*sqrt(block) vectorised
steps), with a hand-written backward that recomputes a block's states instead of storing them all.
ops.cpu_kernels has the compiled CPU twin of the same core.
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


def _time_block(device: torch.device) -> int:
    """Positions whose (batch, block, d_inner, d_state) terms exist at once: on a CPU a few MB that stay in
    cache; on a GPU longer blocks, since each block costs a few hundred small kernel launches."""
    return 64 if device.type == "cpu" else 512


def _block_terms(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """decay exp(delta*A) (zero where a document starts) and drive delta*B*x of one time block, (batch, block, d_inner, d_state)."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    if keep is not None:
        decay.mul_(keep[:, :, None, None])
    return decay, (delta * x).unsqueeze(-1) * B.unsqueeze(2)


class _BlockedScan(torch.autograd.Function):
    """(x, delta, A, B, C, h0, keep) -> (C_t . h_t (batch, length, d_inner), final state), all fp32.

    Walks over time blocks; only the state at each block start is kept, and the backward recomputes a block's
    states from it, so no tensor of size (batch, length, d_inner, d_state) is ever materialised.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, keep):
        block = _time_block(x.device)
        h, starts, ys = h0, [], []
        for s in range(0, x.shape[1], block):
            part = slice(s, s + block)
            decay, drive = _block_terms(x[:, part], delta[:, part], A, B[:, part], None if keep is None else keep[:, part])
            hs = linear_scan_forward(decay, drive, h)
            ys.append(torch.einsum("bldn,bln->bld", hs, C[:, part]))
            starts.append(h)
            h = hs[:, -1]
        ctx.save_for_backward(x, delta, A, B, C, keep, *starts)
        return (torch.cat(ys, dim=1) if ys else x.new_zeros(x.shape)), h

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, delta, A, B, C, keep, *starts = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (x, delta, B, C)]
        grad_x, grad_delta, grad_B, grad_C = grads
        grad_A = torch.zeros_like(A)
        # g = dLoss/dh at the end of the block being processed, through everything after it
        g = A.new_zeros(x.shape[0], *A.shape) if grad_final is None else grad_final.clone()
        block = _time_block(x.device)
        for s, h_start in reversed(list(zip(range(0, x.shape[1], block), starts))):
            part = slice(s, s + block)
            xb, db, Bb = x[:, part], delta[:, part], B[:, part]
            decay, drive = _block_terms(xb, db, A, Bb, None if keep is None else keep[:, part])
            hs = linear_scan_forward(decay, drive, h_start)
            gy = grad_y[:, part]
            # dLoss/dh_t = gy_t C_t + decay_{t+1} dLoss/dh_{t+1}: the same scan, backwards in time
            reverse_decay = torch.cat([torch.ones_like(decay[:, :1]), decay[:, 1:].flip(1)], dim=1)
            gh = linear_scan_forward(reverse_decay, (gy.unsqueeze(-1) * C[:, part].unsqueeze(2)).flip(1), g).flip(1)
            h_prev = torch.cat([h_start.unsqueeze(1), hs[:, :-1]], dim=1)
            g_exponent = gh * h_prev * decay  # dLoss/d(delta*A)
            gh_B = torch.einsum("bldn,bln->bld", gh, Bb)
            grad_delta[:, part] = torch.einsum("bldn,dn->bld", g_exponent, A) + gh_B * xb
            grad_x[:, part] = gh_B * db
            grad_A += torch.einsum("bldn,bld->dn", g_exponent, db)
            grad_B[:, part] = torch.einsum("bldn,bld->bln", gh, db * xb)
            grad_C[:, part] = torch.einsum("bldn,bld->bln", hs, gy)
            g = decay[:, 0] * gh[:, 0]
        return grad_x, grad_delta, grad_A, grad_B, grad_C, g, None


def scan_with(core, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
              z: Tensor | None, initial_state: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
    """The full selective scan around a ``core`` (x, delta, A, B, C, h0, keep) -> (C_t . h_t, final state) in fp32:
    softplus of dt, then the D skip and the silu(z) gate, all in PyTorch (autograd)."""
    delta = F.softplus(dt.float() + dt_bias.float())
    keep = None if reset is None else (~reset).float()
    h0 = x.new_zeros(x.shape[0], *A.shape, dtype=torch.float32) if initial_state is None else initial_state.float()
    y, final = core(x.float(), delta, A.float(), B.float(), C.float(), h0, keep)
    return skip_and_gate(y, x, D, z).to(x.dtype), final


def selective_scan_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
    z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Blocked, chunked parallel scan in pure PyTorch: same contract and results as ``selective_scan_ref``."""
    return scan_with(_BlockedScan.apply, x, dt, A, B, C, D, dt_bias, z, initial_state, reset)

"""One entry point for the selective scan; the mixer never knows which backend runs.

Backends: ``reference`` (sequential, the ground truth), ``chunked`` (pure PyTorch, any device).
The choice: the ``backend`` argument, else the MAMBABYTE_SCAN environment variable, else automatic.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from mambabyte.errors import UserError
from mambabyte.ops.selective_scan import selective_scan_chunked, selective_scan_ref

SCAN_BACKENDS = {
    "reference": selective_scan_ref,
    "chunked": selective_scan_chunked,
}


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use on ``device``."""
    name = backend or os.environ.get("MAMBABYTE_SCAN") or "auto"
    if name == "auto":
        return "chunked"
    if name not in SCAN_BACKENDS:
        raise UserError(f"unknown scan backend {name!r}; choose one of: auto, {', '.join(SCAN_BACKENDS)}")
    return name


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                   z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(y (batch, length, d_inner), final state (batch, d_inner, d_state)); see ops.selective_scan."""
    scan = SCAN_BACKENDS[resolve_backend(backend, x.device)]
    return scan(x, dt, A, B, C, D, dt_bias, z=z, initial_state=initial_state, reset=reset)


def selective_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                   z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One position of the scan: x, dt, z (batch, d_inner); B, C (batch, d_state) -> (y, next state)."""
    delta = F.softplus(dt.float() + dt_bias.float())
    state = torch.exp(delta.unsqueeze(-1) * A.float()) * state + (delta * x.float()).unsqueeze(-1) * B.float().unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", state, C.float()) + D.float() * x.float()
    return (y * F.silu(z.float())).to(x.dtype), state

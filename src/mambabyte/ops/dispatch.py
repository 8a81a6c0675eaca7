"""One entry point for the selective scan; the mixer never knows which backend runs.

Backends: ``reference`` (sequential, the ground truth), ``chunked`` (pure PyTorch, any device), and ``triton``
(ops.triton_scan; CUDA tensors, or CPU under TRITON_INTERPRET=1) where Triton is installed and can run.
The choice: the ``backend`` argument, else the MAMBABYTE_SCAN environment variable, else automatic
(triton for CUDA tensors when available; on the CPU ``cpu``, the compiled kernel of ops.cpu_kernels, when it
builds; chunked otherwise).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from mambabyte.errors import UserError
from mambabyte.ops import cpu_kernels
from mambabyte.ops.selective_scan import selective_scan_chunked, selective_scan_ref

SCAN_BACKENDS = {
    "reference": selective_scan_ref,
    "chunked": selective_scan_chunked,
}

TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def _selective_scan_triton(*args, **kwargs) -> tuple[Tensor, Tensor]:
    from mambabyte.ops.triton_scan import selective_scan_triton  # imported late: TRITON_INTERPRET is read then

    return selective_scan_triton(*args, **kwargs)


if TRITON_RUNS:
    SCAN_BACKENDS["triton"] = _selective_scan_triton
if cpu_kernels.may_build():
    SCAN_BACKENDS["cpu"] = cpu_kernels.selective_scan_cpu


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to use on ``device``."""
    name = backend or os.environ.get("MAMBABYTE_SCAN") or "auto"
    if name == "auto":
        if device.type == "cuda" and "triton" in SCAN_BACKENDS:
            return "triton"
        return "cpu" if device.type == "cpu" and "cpu" in SCAN_BACKENDS and cpu_kernels.available() else "chunked"
    if name not in SCAN_BACKENDS:
        raise UserError(f"unknown scan backend {name!r}; choose one of: auto, {', '.join(SCAN_BACKENDS)}")
    return name


def selective_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                   z: Tensor | None = None, initial_state: Tensor | None = None, reset: Tensor | None = None,
                   backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(y (batch, length, d_inner), final state (batch, d_inner, d_state)); see ops.selective_scan."""
    scan = SCAN_BACKENDS[resolve_backend(backend, x.device)]
    with torch.autocast(x.device.type, enabled=False):  # backends choose their own precision (fp32 state)
        return scan(x, dt, A, B, C, D, dt_bias, z=z, initial_state=initial_state, reset=reset)


def selective_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                   z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One position of the scan: x, dt, z (batch, d_inner); B, C (batch, d_state) -> (y, next state).

    One fused Triton kernel for CUDA tensors without autograd (decoding), the compiled CPU kernel for CPU
    tensors without autograd (ops.cpu_kernels), else ``selective_step_torch``.
    """
    if x.is_cuda and TRITON_RUNS and not (torch.is_grad_enabled() and x.requires_grad):
        from mambabyte.ops.triton_step import selective_step_triton

        return selective_step_triton(x, dt, A, B, C, D, dt_bias, z, state)
    if x.device.type == "cpu" and not torch.is_grad_enabled() and cpu_kernels.available():
        return cpu_kernels.selective_step_cpu(x, dt, A, B, C, D, dt_bias, z, state)
    return selective_step_torch(x, dt, A, B, C, D, dt_bias, z, state)


def selective_step_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                         z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One position of the scan in plain PyTorch (any device, differentiable)."""
    delta = F.softplus(dt.float() + dt_bias.float())
    state = torch.exp(delta.unsqueeze(-1) * A.float()) * state + (delta * x.float()).unsqueeze(-1) * B.float().unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", state, C.float()) + D.float() * x.float()
    return (y * F.silu(z.float())).to(x.dtype), state

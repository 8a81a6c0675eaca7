"""The Mamba-1 block (Gu & Dao 2023), as in DESIGN.md: in_proj, causal conv, x_proj, dt_proj, scan, gate, out_proj."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mambabyte.config import MambaByteConfig
from mambabyte.ops import cpu_kernels, causal_conv1d, causal_conv1d_step, selective_scan, selective_step


# Devices where training recomputes conv + SiLU in the backward instead of keeping its output: GPU memory is
# the limit there; on a CPU the recompute costs 3-5% of a step for memory it does not need.
RECOMPUTE_CONV_ON = ("cuda",)


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor, conv_state: Tensor | None, reset: Tensor | None,
              ) -> tuple[Tensor, Tensor]:
    """SiLU(causal conv(x)) and the conv's next window."""
    return causal_conv1d(x, weight, bias, conv_state, reset, silu=True)


class LayerState(NamedTuple):
    """Decoding state of one layer; its size does not depend on how many bytes came before."""

    conv: Tensor  # (batch, d_inner, d_conv - 1): the last inputs of the causal conv
    ssm: Tensor  # (batch, d_inner, d_state), fp32


class MambaMixer(nn.Module):
    def __init__(self, config: MambaByteConfig):
        super().__init__()
        self.config = config
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=False)
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """dt_proj weight uniform in +-dt_rank^-0.5; softplus(bias) log-uniform in [dt_min, dt_max]."""
        c = self.config
        nn.init.uniform_(self.dt_proj.weight, -c.dt_rank**-0.5, c.dt_rank**-0.5)
        dt = torch.exp(torch.rand(c.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt (before dt_bias), B, C from the conv output x."""
        dt_low, B, C = self.x_proj(x).split([self.config.dt_rank, self.config.d_state, self.config.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)  # dt_bias is added inside the scan, before softplus
        return dt, B, C

    def forward(self, hidden: Tensor, state: LayerState | None = None, reset: Tensor | None = None,
                ) -> tuple[Tensor, LayerState]:
        """hidden (batch, length, d_model) -> (out (batch, length, d_model), state after the last position)."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        conv_inputs = (x, self.conv1d.weight, self.conv1d.bias, None if state is None else state.conv, reset)
        if torch.is_grad_enabled() and x.device.type in RECOMPUTE_CONV_ON:
            x, conv_state = checkpoint(conv_silu, *conv_inputs, use_reentrant=False)
        else:
            x, conv_state = conv_silu(*conv_inputs)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_scan(x, dt, A, B, C, self.D, self.dt_proj.bias, z=z,
                                      initial_state=None if state is None else state.ssm, reset=reset)
        return self.out_proj(y), LayerState(conv_state, ssm_state)

    def step(self, hidden: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One position: hidden (batch, d_model) -> (out (batch, d_model), next state)."""
        xz = self.in_proj(hidden)
        if cpu_kernels.mixer_step_applies(xz, self.x_proj.weight, state.conv):  # decoding on CPU: one fused call
            y, conv_state, ssm_state = cpu_kernels.mixer_step_cpu(
                xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias,
                self.A_log, self.D, state.conv, state.ssm)
            return self.out_proj(y), LayerState(conv_state, ssm_state)
        x, z = xz.chunk(2, dim=-1)
        x, conv_state = causal_conv1d_step(x, self.conv1d.weight, self.conv1d.bias, state.conv)
        x = F.silu(x)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_step(x, dt, A, B, C, self.D, self.dt_proj.bias, z, state.ssm)
        return self.out_proj(y), LayerState(conv_state, ssm_state)

    def forward_states(self, hidden: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """Like ``forward`` from ``state``, but keeps the state after every position (for speculative decoding).

        hidden (batch, length, d_model) -> (out (batch, length, d_model), LayerState with a length dim:
        conv (batch, length, d_inner, d_conv - 1), ssm (batch, length, d_inner, d_state)). Meant for short spans.
        """
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        window = torch.cat([state.conv.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (batch, d_inner, K-1 + length)
        conv_states = window.unfold(2, self.config.d_conv - 1, 1)[:, :, 1:].transpose(1, 2)
        x, _ = conv_silu(x, self.conv1d.weight, self.conv1d.bias, state.conv, None)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        ssm, ys, ssm_states = state.ssm, [], []
        for t in range(x.shape[1]):
            y, ssm = selective_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], self.D, self.dt_proj.bias, z[:, t], ssm)
            ys.append(y)
            ssm_states.append(ssm)
        return self.out_proj(torch.stack(ys, 1)), LayerState(conv_states.to(state.conv.dtype), torch.stack(ssm_states, 1))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> LayerState:
        c = self.config
        return LayerState(
            conv=torch.zeros(batch, c.d_inner, c.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, c.d_inner, c.d_state, device=device, dtype=torch.float32),
        )

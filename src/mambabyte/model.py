"""The MambaByte language model: byte embedding -> pre-norm Mamba blocks -> final RMSNorm -> tied byte head.

Every model of the toolkit honours the same contract (training, evaluation and generation use only this):
``forward(ids, state=None, return_state=False)``, ``init_state(batch)``, ``step(ids, state)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambabyte.config import MambaByteConfig
from mambabyte.mixer import LayerState, MambaMixer
from mambabyte.ops import cpu_kernels
from mambabyte.ops.dispatch import TRITON_RUNS


def fused_span_applies(hidden: Tensor) -> bool:
    """True where a block's decoding step / short span runs as the fused Triton kernels of ops.triton_decode."""
    return hidden.is_cuda and TRITON_RUNS and not torch.is_grad_enabled()


MAX_FUSED_HEAD_ROWS = 1024  # the fused norm + head kernel is for decoding; long sequences go to cuBLAS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then in the weights' dtype (what the next projection reads)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype) * self.weight


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)); the residual stream stays fp32."""

    def __init__(self, config: MambaByteConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config)

    def forward(self, hidden: Tensor, state: LayerState | None = None, reset: Tensor | None = None):
        out, state = self.mixer(self.norm(hidden), state, reset)
        return hidden + out, state  # fp32 + bf16 adds in fp32, in one kernel

    def _span_triton(self, hidden: Tensor, state: LayerState, keep_states: bool = False, in_place: bool = False,
                     ) -> tuple[Tensor, LayerState]:
        from mambabyte.ops.triton_decode import block_span

        m = self.mixer
        hidden, conv_state, ssm_state = block_span(
            hidden, self.norm.weight, self.norm.eps, m.in_proj.weight, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight,
            m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight, state.conv, state.ssm, keep_states,
            in_place)
        return hidden, LayerState(conv_state, ssm_state)

    def step_(self, hidden: Tensor, state: LayerState) -> Tensor:
        """``step`` that writes the next state over ``state`` and returns the new hidden."""
        if fused_span_applies(hidden) and state.conv.is_contiguous() and state.ssm.is_contiguous():
            return self._span_triton(hidden[:, None], state, in_place=True)[0][:, 0]
        hidden, new_state = self.step(hidden, state)
        for buffer, value in zip(state, new_state):
            buffer.copy_(value)
        return hidden

    def step(self, hidden: Tensor, state: LayerState):
        if fused_span_applies(hidden):  # CUDA decoding: the block in four kernels
            hidden, state = self._span_triton(hidden[:, None], state, keep_states=False)
            return hidden[:, 0], state
        m = self.mixer
        if cpu_kernels.block_step_applies(hidden, m.in_proj.weight, state.conv):  # CPU decoding: the block in one call
            hidden, conv_state, ssm_state = cpu_kernels.block_step_cpu(
                hidden, self.norm.weight, self.norm.eps, m.in_proj.weight, m.conv1d.weight, m.conv1d.bias,
                m.x_proj.weight, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D, m.out_proj.weight, state.conv, state.ssm)
            return hidden, LayerState(conv_state, ssm_state)
        out, state = self.mixer.step(self.norm(hidden), state)
        return hidden + out, state

    def forward_states(self, hidden: Tensor, state: LayerState):
        if fused_span_applies(hidden):
            return self._span_triton(hidden, state, keep_states=True)
        out, states = self.mixer.forward_states(self.norm(hidden), state)
        return hidden + out, states


class MambaByteLM(nn.Module):
    def __init__(self, config: MambaByteConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.02)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            out_proj /= math.sqrt(self.config.n_layer)  # GPT-2-style rescale of the residual branch

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm and the byte head, tied to the embedding."""
        if fused_span_applies(hidden) and hidden.numel() <= MAX_FUSED_HEAD_ROWS * hidden.shape[-1]:
            from mambabyte.ops.triton_decode import norm_linear

            return norm_linear(hidden, self.norm_f.weight, self.norm_f.eps, self.embedding.weight)
        normed = self.norm_f(hidden)
        return normed @ self.embedding.weight.t().to(normed.dtype)

    def forward(self, ids: Tensor, state: list[LayerState] | None = None, return_state: bool = False,
                reset: Tensor | None = None):
        """ids (batch, length) -> logits (batch, length, 256) fp32, and the state after the last byte if asked.

        ``state`` continues from an earlier call; ``reset`` (batch, length) bool starts a fresh document there.
        """
        hidden = self.embedding(ids).float()
        new_state = []
        for i, layer in enumerate(self.layers):
            hidden, layer_state = layer(hidden, None if state is None else state[i], reset)
            new_state.append(layer_state)
        logits = self.head(hidden).float()
        return (logits, new_state) if return_state else logits

    def step(self, ids: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """One byte per row: ids (batch,) -> (logits (batch, 256) fp32, next state)."""
        hidden = self.embedding(ids).float()
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            hidden, layer_state = layer.step(hidden, layer_state)
            new_state.append(layer_state)
        return self.head(hidden).float(), new_state

    def step_(self, ids: Tensor, state: list[LayerState]) -> Tensor:
        """``step`` that writes the next state over ``state`` (a decoding loop's fixed buffers): logits only."""
        hidden = self.embedding(ids).float()
        for layer, layer_state in zip(self.layers, state):
            hidden = layer.step_(hidden, layer_state)
        return self.head(hidden).float()

    def forward_states(self, ids: Tensor, state: list[LayerState]) -> tuple[Tensor, list[LayerState]]:
        """ids (batch, length) read from ``state`` -> (logits (batch, length, 256), the state after every position).

        Each LayerState of the result has a length dim after the batch dim; ``state_at`` picks one position.
        Speculative decoding verifies a draft with one call and rolls back to any accepted position.
        """
        hidden = self.embedding(ids).float()
        states = []
        for layer, layer_state in zip(self.layers, state):
            hidden, layer_states = layer.forward_states(hidden, layer_state)
            states.append(layer_states)
        return self.head(hidden).float(), states

    @staticmethod
    def state_at(states: list[LayerState], position: int) -> list[LayerState]:
        """The state after ``position`` from ``forward_states``' result (a view: clone it to keep it)."""
        return [LayerState(s.conv[:, position], s.ssm[:, position]) for s in states]

    def init_state(self, batch: int, device=None, dtype=None) -> list[LayerState]:
        """The empty state: zeros, one (conv, ssm) pair per layer."""
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return [layer.mixer.init_state(batch, device, dtype) for layer in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self) -> int:
        """Forward FLOPs for one byte: 2 per multiply-add of every projection, the conv, the scan and the head."""
        c = self.config
        projections = c.d_model * 2 * c.d_inner + c.d_inner * (c.dt_rank + 2 * c.d_state) + c.dt_rank * c.d_inner
        projections += c.d_inner * c.d_model
        conv = c.d_conv * c.d_inner
        scan = 4 * c.d_inner * c.d_state  # decay*h + (delta*B)*x, then C.h: ~4 multiply-adds per state entry
        per_layer = 2 * (projections + conv + scan)
        return c.n_layer * per_layer + 2 * c.d_model * c.vocab_size

    def state_bytes_per_layer(self, batch: int = 1) -> int:
        """Bytes of decoding state per layer (conv window in the weights' dtype, SSM state in fp32)."""
        c = self.config
        weight_bytes = self.embedding.weight.element_size()
        return batch * c.d_inner * ((c.d_conv - 1) * weight_bytes + c.d_state * 4)

"""A byte-level decoder-only Transformer: byte embedding -> pre-norm blocks (RoPE attention, SwiGLU MLP) ->
final RMSNorm -> byte head tied to the embedding. Its decoding "state" is the KV cache of every layer and
where each row's current document starts (a reset hides the keys before it; RoPE being relative, a
document then attends exactly as it would alone).

The attention stack (``TransformerStack``) is shared with MegaByte, which runs one over patches and one
inside each patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from mambabyte.config import MambaByteConfig
from mambabyte.errors import UserError
from mambabyte.model import RMSNorm


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a byte-level Transformer (decoder-only, RoPE, SwiGLU) over 256 byte ids."""

    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 0  # SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of 64
    vocab_size: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    context_length: int = 2048  # the window FLOPs per byte and state size assume; not a limit on the model
    arch: str = "transformer"

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", default_ff_width(self.d_model))
        for name in ("d_model", "n_layer", "n_head", "d_ff", "vocab_size", "context_length"):
            if getattr(self, name) < 1:
                raise UserError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        check_heads(self.d_model, self.n_head)

    to_dict = MambaByteConfig.to_dict  # one dict form for every config
    from_dict = classmethod(MambaByteConfig.from_dict.__func__)


def default_ff_width(d_model: int) -> int:
    """SwiGLU hidden width with about the parameters of a 4x GELU MLP: 8/3 d, up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def check_heads(d_model: int, n_head: int) -> None:
    if n_head < 1 or d_model % n_head or (d_model // n_head) % 2:
        raise UserError(f"d_model {d_model} must split into {n_head} heads of an even width (RoPE)")


# Sizes chosen so each has about the parameters of the mambabyte preset of the same name.
PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(d_model=32, n_layer=2, n_head=2, d_ff=48, context_length=256),
    "small": TransformerConfig(d_model=256, n_layer=4, n_head=4),
    "bench-91m": TransformerConfig(d_model=768, n_layer=13, n_head=12),
}


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for one attention layer."""

    keys: Tensor  # (batch, n_head, length, head_dim)
    values: Tensor  # (batch, n_head, length, head_dim)


class TransformerState(NamedTuple):
    caches: list[KVCache]  # one per layer
    document_start: Tensor  # (batch,) int64: the position where each row's current document starts


def document_mask(reset: Tensor | None, document_start: Tensor, offset: int, length: int) -> tuple[Tensor, Tensor]:
    """Keys each of ``length`` new positions (after ``offset`` cached ones) may see: causal, in its own document.

    reset (batch, length) bool or None; document_start (batch,) -> (mask (batch, 1, length, offset + length) bool,
    the document start after the last new position (batch,)).
    """
    positions = torch.arange(offset, offset + length, device=document_start.device)
    starts = document_start[:, None].expand(-1, length)
    if reset is not None:
        starts = torch.maximum(starts, torch.where(reset, positions, 0).cummax(dim=1).values)
    keys = torch.arange(offset + length, device=document_start.device)
    mask = (keys <= positions[:, None]) & (keys >= starts[:, :, None])
    return mask[:, None], starts[:, -1]


def rotary_angles(length: int, offset: int, head_dim: int, base: float, device) -> tuple[Tensor, Tensor]:
    """cos and sin (length, head_dim / 2) of the rotary angles at positions offset .. offset + length - 1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates each (first half, second half) pair of x (batch, n_head, length, head_dim) by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], cache: KVCache | None, mask: Tensor | None = None,
                ) -> tuple[Tensor, KVCache]:
        """x (batch, length, d_model) after the cached positions -> (out (batch, length, d_model), grown cache).

        ``mask`` (batch, 1, length, keys) bool replaces the causal mask (see ``document_mask``).
        """
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, d_model // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None and cache.keys.shape[2] > 0:
            k = torch.cat([cache.keys.to(k.dtype), k], dim=2)
            v = torch.cat([cache.values.to(v.dtype), v], dim=2)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif k.shape[2] == length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        elif length == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new position sees the whole cache
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(length, k.shape[2]))
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model)), KVCache(k, v)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.out_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h)); the residual stream stays fp32."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, norm_eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, hidden: Tensor, rotary: tuple[Tensor, Tensor], cache: KVCache | None, mask: Tensor | None):
        out, cache = self.attn(self.attn_norm(hidden), rotary, cache, mask)
        hidden = hidden + out.float()
        return hidden + self.mlp(self.mlp_norm(hidden)).float(), cache


class TransformerStack(nn.Module):
    """n_layer causal blocks with RoPE; continues from per-layer KV caches when given."""

    def __init__(self, d_model: int, n_layer: int, n_head: int, d_ff: int, norm_eps: float, rope_base: float):
        super().__init__()
        check_heads(d_model, n_head)
        self.n_head, self.head_dim, self.rope_base = n_head, d_model // n_head, rope_base
        self.layers = nn.ModuleList(TransformerBlock(d_model, n_head, d_ff, norm_eps) for _ in range(n_layer))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: normal(0.02) weights, residual projections scaled by 1/sqrt(2 n_layer)."""
        for name, param in self.named_parameters():
            if param.ndim == 2:
                std = 0.02 / math.sqrt(2 * len(self.layers)) if name.endswith("out_proj.weight") else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, hidden: Tensor, caches: list[KVCache] | None = None, mask: Tensor | None = None,
                ) -> tuple[Tensor, list[KVCache]]:
        """hidden (batch, length, d_model) -> (hidden (batch, length, d_model), caches grown by length).

        Causal by default; ``mask`` (batch, 1, length, keys) bool says which keys each position sees instead.
        """
        offset = 0 if caches is None else caches[0].keys.shape[2]
        rotary = rotary_angles(hidden.shape[1], offset, self.head_dim, self.rope_base, hidden.device)
        new_caches = []
        for i, layer in enumerate(self.layers):
            hidden, cache = layer(hidden, rotary, None if caches is None else caches[i], mask)
            new_caches.append(cache)
        return hidden, new_caches

    def empty_caches(self, batch: int, device, dtype) -> list[KVCache]:
        empty = torch.zeros(batch, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return [KVCache(empty, empty) for _ in self.layers]

    def matmul_flops_per_position(self) -> int:
        """Forward FLOPs of every weight matrix for one position: 2 per multiply-add."""
        return 2 * sum(p.numel() for p in self.parameters() if p.ndim == 2)


def attention_flops_per_position(n_layer: int, d_model: int, keys: float) -> float:
    """QK^T and attention-weighted V: 2 * d_model multiply-adds per key, 2 FLOPs each, in every layer."""
    return 4 * n_layer * d_model * keys


class ByteTransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = TransformerStack(config.d_model, config.n_layer, config.n_head, config.d_ff,
                                       config.norm_eps, config.rope_base)
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm and the byte head, tied to the embedding."""
        return self.norm_f(hidden) @ self.embedding.weight.t().to(hidden.dtype)

    def forward(self, ids: Tensor, state: TransformerState | None = None, return_state: bool = False,
                reset: Tensor | None = None):
        """ids (batch, length) -> logits (batch, length, 256) fp32, and the grown state if asked.

        ``state`` continues after the positions already cached (RoPE positions count on from there);
        ``reset`` (batch, length) bool starts a fresh document there: later positions no longer see the keys before.
        """
        batch, length = ids.shape
        if state is None:
            state = self.init_state(batch, ids.device)
        offset = state.caches[0].keys.shape[2]
        mask, document_start = None, state.document_start
        # host checks: the plain causal mask (flash attention) unless some row's document starts after position 0
        if (reset is not None and bool(reset.any())) or (offset and bool(document_start.any())):
            mask, document_start = document_mask(reset, document_start, offset, length)
        hidden, caches = self.blocks(self.embedding(ids).float(), state.caches, mask)
        logits = self.head(hidden).float()
        return (logits, TransformerState(caches, document_start)) if return_state else logits

    def step(self, ids: Tensor, state: TransformerState) -> tuple[Tensor, TransformerState]:
        """One byte per row: ids (batch,) -> (logits (batch, 256) fp32, caches one position longer)."""
        offset = state.caches[0].keys.shape[2]
        keys = torch.arange(offset + 1, device=ids.device)
        mask = (keys >= state.document_start[:, None])[:, None, None]  # no host sync: (batch, 1, 1, keys)
        hidden, caches = self.blocks(self.embedding(ids[:, None]).float(), state.caches, mask)
        return self.head(hidden[:, 0]).float(), TransformerState(caches, state.document_start)

    def init_state(self, batch: int, device=None, dtype=None) -> TransformerState:
        """Empty KV caches (zero positions), one per layer; every row's document starts at position 0."""
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return TransformerState(self.blocks.empty_caches(batch, device, dtype),
                                torch.zeros(batch, dtype=torch.long, device=device))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self, context_length: int | None = None) -> int:
        """Forward FLOPs for one byte: every weight matrix, attention, and the head.

        Attention over a causal window of ``context_length`` bytes (default: config.context_length, the
        training length) sees (context_length + 1) / 2 keys per byte on average.
        """
        c = self.config
        keys = ((context_length or c.context_length) + 1) / 2
        attention = attention_flops_per_position(c.n_layer, c.d_model, keys)
        return round(self.blocks.matmul_flops_per_position() + attention + 2 * c.d_model * c.vocab_size)

    def state_bytes_per_layer(self, batch: int = 1, context_length: int | None = None) -> int:
        """Bytes of KV cache per layer after ``context_length`` bytes (default: config.context_length)."""
        c = self.config
        return batch * 2 * c.d_model * (context_length or c.context_length) * self.embedding.weight.element_size()

"""MegaByte (Yu et al. 2023): a global Transformer over patches of P bytes and a local Transformer inside each patch.

Byte t of the stream is the input of position t; the logits there predict byte t + 1 (the toolkit's
contract). Positions are cut into patches of P. The global model's input for patch k is the concatenated
byte embeddings of patch k - 1 (a pad patch for k = 0), so it only sees bytes before the patch; its output,
split into P slices and projected to the local width, is added to the local byte embeddings of patch k,
and the local model runs causally inside the patch. ``step()`` advances the global model once per patch.
(The paper feeds the local model the byte before each target; here each position's input is the byte it
just read, which is the same model with patch boundaries one byte later.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambabyte.baselines.transformer import (
    KVCache,
    TransformerStack,
    attention_flops_per_position,
    check_heads,
    default_ff_width,
)
from mambabyte.config import MambaByteConfig
from mambabyte.errors import UserError
from mambabyte.model import RMSNorm


@dataclass(frozen=True)
class MegaByteConfig:
    """Shape of a MegaByte model: patch size, then the global (over patches) and local (in a patch) Transformers."""

    patch_size: int = 8
    d_global: int = 512  # global model width = patch_size x the global byte-embedding width
    n_layer_global: int = 4
    n_head_global: int = 8
    d_local: int = 256
    n_layer_local: int = 2
    n_head_local: int = 4
    d_ff_global: int = 0  # SwiGLU hidden widths; 0 means 8/3 * width rounded up to a multiple of 64
    d_ff_local: int = 0
    vocab_size: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    context_length: int = 2048  # the window FLOPs per byte and state size assume; not a limit on the model
    arch: str = "megabyte"

    def __post_init__(self) -> None:
        for name, width in (("d_ff_global", self.d_global), ("d_ff_local", self.d_local)):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, default_ff_width(width))
        for name in ("patch_size", "d_global", "n_layer_global", "d_local", "n_layer_local", "d_ff_global",
                     "d_ff_local", "vocab_size", "context_length"):
            if getattr(self, name) < 1:
                raise UserError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.d_global % self.patch_size:
            raise UserError(f"d_global {self.d_global} must be a multiple of patch_size {self.patch_size}")
        check_heads(self.d_global, self.n_head_global)
        check_heads(self.d_local, self.n_head_local)

    @property
    def n_layer(self) -> int:
        return self.n_layer_global + self.n_layer_local

    to_dict = MambaByteConfig.to_dict  # one dict form for every config
    from_dict = classmethod(MambaByteConfig.from_dict.__func__)


# Sizes chosen so each has about the parameters of the mambabyte preset of the same name; like the paper's
# models, most parameters sit in the global model.
PRESETS: dict[str, MegaByteConfig] = {
    "tiny": MegaByteConfig(patch_size=4, d_global=32, n_layer_global=1, n_head_global=2, d_local=32,
                           n_layer_local=1, n_head_local=2, d_ff_global=32, d_ff_local=32, context_length=256),
    "small": MegaByteConfig(patch_size=8, d_global=256, n_layer_global=3, n_head_global=4, d_local=192,
                            n_layer_local=2, n_head_local=3),
    "bench-91m": MegaByteConfig(patch_size=8, d_global=1024, n_layer_global=6, n_head_global=16, d_local=512,
                                n_layer_local=4, n_head_local=8),
}


def refuse_reset(reset: Tensor | None) -> None:
    """Patches span document boundaries; MegaByte cannot start a new document inside a row.

    Any ``reset`` is refused, even one with no flag set, so that training with resets fails at its first step.
    """
    if reset is not None:
        raise UserError("the megabyte baseline cannot start a document inside a row (reset): train it without "
                        "document resets, and batch only prompts of one length")


class MegaByteState(NamedTuple):
    """Decoding state: the caches of both models and what the next byte's patch needs."""

    global_cache: list[KVCache]  # one per global layer; length = patches started so far
    local_cache: list[KVCache]  # one per local layer; length = bytes fed in the current patch (0 .. P)
    patch_bytes: Tensor  # (batch, bytes fed in the current patch): the next patch's global input
    patch_context: Tensor  # (batch, P, d_local): the global model's output for the current patch


class MegaByteLM(nn.Module):
    def __init__(self, config: MegaByteConfig):
        super().__init__()
        self.config = config
        c = config
        byte_width = c.d_global // c.patch_size
        self.pad_byte = c.vocab_size  # fills the patch before the first one
        self.global_embedding = nn.Embedding(c.vocab_size + 1, byte_width)
        self.global_model = TransformerStack(c.d_global, c.n_layer_global, c.n_head_global, c.d_ff_global,
                                             c.norm_eps, c.rope_base)
        self.global_norm = RMSNorm(c.d_global, c.norm_eps)
        self.global_to_local = nn.Linear(byte_width, c.d_local, bias=False)
        self.local_embedding = nn.Embedding(c.vocab_size, c.d_local)
        self.local_model = TransformerStack(c.d_local, c.n_layer_local, c.n_head_local, c.d_ff_local,
                                            c.norm_eps, c.rope_base)
        self.norm_f = RMSNorm(c.d_local, c.norm_eps)
        for weight in (self.global_embedding.weight, self.global_to_local.weight, self.local_embedding.weight):
            nn.init.normal_(weight, std=0.02)

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm and the byte head, tied to the local embedding."""
        return self.norm_f(hidden) @ self.local_embedding.weight.t().to(hidden.dtype)

    def _global(self, patches: Tensor, cache: list[KVCache]) -> tuple[Tensor, list[KVCache]]:
        """Previous patches (batch, n, P) bytes -> contexts (batch, n, P, d_local) for the patches after them."""
        batch, n, patch = patches.shape
        hidden = self.global_embedding(patches).reshape(batch, n, self.config.d_global).float()
        hidden, cache = self.global_model(hidden, cache)
        hidden = self.global_norm(hidden).view(batch, n, patch, -1)
        return self.global_to_local(hidden), cache

    def forward(self, ids: Tensor, state: MegaByteState | None = None, return_state: bool = False,
                reset: Tensor | None = None):
        """ids (batch, length) -> logits (batch, length, 256) fp32, and the state after the last byte if asked.

        From a state inside a patch, the bytes already fed in that patch are run through the local model again
        (at most P - 1 of them) so that the new bytes see them.
        """
        refuse_reset(reset)
        batch, length = ids.shape
        patch = self.config.patch_size
        if state is None:
            state = self.init_state(batch, ids.device)
        if length == 0:
            logits = torch.zeros(batch, 0, self.config.vocab_size, device=ids.device)
            return (logits, state) if return_state else logits
        fed = state.patch_bytes.shape[1]
        if fed % patch:  # the current patch continues: its global context is known
            stream = torch.cat([state.patch_bytes, ids], dim=1)
            known = state.patch_context[:, None]
        else:  # the first byte starts a new patch, whose global input is the previous one
            stream = ids
            known = None
            before = state.patch_bytes if fed else torch.full((batch, patch), self.pad_byte, device=ids.device)
        start = stream.shape[1] - length
        n_patch = math.ceil(stream.shape[1] / patch)
        patches = F.pad(stream, (0, n_patch * patch - stream.shape[1])).view(batch, n_patch, patch)
        global_input = patches[:, :-1] if known is not None else torch.cat([before[:, None], patches[:, :-1]], 1)
        if global_input.shape[1]:
            contexts, global_cache = self._global(global_input, state.global_cache)
            contexts = contexts if known is None else torch.cat([known.to(contexts.dtype), contexts], dim=1)
        else:  # all new bytes fall in the current patch
            contexts, global_cache = known, state.global_cache
        hidden = self.local_embedding(patches).float() + contexts.float()  # (batch, n_patch, P, d_local)
        hidden, local_cache = self.local_model(hidden.view(batch * n_patch, patch, -1))
        logits = self.head(hidden).float().view(batch, n_patch * patch, -1)[:, start:start + length]
        if not return_state:
            return logits
        in_last = stream.shape[1] - (n_patch - 1) * patch
        last_patch_cache = [KVCache(*(t.unflatten(0, (batch, n_patch))[:, -1, :, :in_last] for t in cache))
                            for cache in local_cache]
        new_state = MegaByteState(global_cache, last_patch_cache, stream[:, (n_patch - 1) * patch:],
                                  contexts[:, -1])
        return logits, new_state

    def step(self, ids: Tensor, state: MegaByteState) -> tuple[Tensor, MegaByteState]:
        """One byte per row: ids (batch,) -> (logits (batch, 256) fp32, next state)."""
        global_cache, local_cache, patch_bytes, context = state
        position = patch_bytes.shape[1] % self.config.patch_size
        if position == 0:  # a new patch: advance the global model once
            before = patch_bytes if patch_bytes.shape[1] else torch.full(
                (ids.shape[0], self.config.patch_size), self.pad_byte, device=ids.device)
            context, global_cache = self._global(before[:, None], global_cache)
            context = context[:, 0]
            local_cache = self.local_model.empty_caches(ids.shape[0], ids.device, local_cache[0].keys.dtype)
            patch_bytes = patch_bytes[:, :0]
        hidden = self.local_embedding(ids).float() + context[:, position].float()
        hidden, local_cache = self.local_model(hidden[:, None], local_cache)
        state = MegaByteState(global_cache, local_cache, torch.cat([patch_bytes, ids[:, None]], dim=1), context)
        return self.head(hidden[:, 0]).float(), state

    def init_state(self, batch: int, device=None, dtype=None) -> MegaByteState:
        """Empty caches, no bytes fed; the first byte will start patch 0."""
        device = device or self.local_embedding.weight.device
        dtype = dtype or self.local_embedding.weight.dtype
        return MegaByteState(
            global_cache=self.global_model.empty_caches(batch, device, dtype),
            local_cache=self.local_model.empty_caches(batch, device, dtype),
            patch_bytes=torch.zeros(batch, 0, dtype=torch.long, device=device),
            patch_context=torch.zeros(batch, self.config.patch_size, self.config.d_local, device=device, dtype=dtype),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self, context_length: int | None = None) -> int:
        """Forward FLOPs for one byte: the global model's per-patch cost shared by P bytes, plus the local model.

        Global attention over a causal window of ``context_length`` bytes (default: config.context_length, the
        training length) sees (patches + 1) / 2 patches on average; local attention (P + 1) / 2 bytes.
        """
        c = self.config
        patches = math.ceil((context_length or c.context_length) / c.patch_size)
        global_per_patch = (self.global_model.matmul_flops_per_position()
                            + attention_flops_per_position(c.n_layer_global, c.d_global, (patches + 1) / 2)
                            + 2 * c.d_global * c.d_local)  # global_to_local, once per byte slice
        local = (self.local_model.matmul_flops_per_position()
                 + attention_flops_per_position(c.n_layer_local, c.d_local, (c.patch_size + 1) / 2))
        return round(global_per_patch / c.patch_size + local + 2 * c.d_local * c.vocab_size)

    def state_bytes_per_layer(self, batch: int = 1, context_length: int | None = None) -> int:
        """Bytes of decoding state, averaged over all layers, after ``context_length`` bytes (default: config's).

        The global KV cache grows by one entry per patch; the local one holds at most P entries.
        """
        c = self.config
        element = self.local_embedding.weight.element_size()
        patches = math.ceil((context_length or c.context_length) / c.patch_size)
        global_cache = c.n_layer_global * 2 * c.d_global * patches * element
        local_cache = c.n_layer_local * 2 * c.d_local * c.patch_size * element
        rest = c.patch_size * (8 + c.d_local * element)  # patch bytes (int64) and the patch context
        return batch * (global_cache + local_cache + rest) // c.n_layer

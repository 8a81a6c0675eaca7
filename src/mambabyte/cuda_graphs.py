"""Capturing CUDA graphs for the decoding loops (speculative decoding's models, prompt reading)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class GraphCapture:
    """Captures CUDA graphs; after the first failure it warns once and captures nothing more (callers go eager)."""

    def __init__(self):
        self.failed = False

    def __call__(self, body: Callable[[], object], device: torch.device, restore: Sequence[Tensor] = (),
                 pool=None) -> tuple[torch.cuda.CUDAGraph | None, object]:
        """-> (the graph of ``body``, what ``body`` returned while captured: tensors that replays overwrite),
        or (None, None). ``restore``: tensors ``body`` writes over, given back their values after the warm-up."""
        if self.failed:
            return None, None
        saved = [tensor.clone() for tensor in restore]
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (allocations, kernel compilation)
                    body()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = body()
            return graph, out
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed, going on without CUDA graphs: "
                          f"{str(error).splitlines()[0]}")
            self.failed = True
            return None, None
        finally:
            for tensor, value in zip(restore, saved):
                tensor.copy_(value)


# Prompt reading in power-of-two buckets, from CUDA graphs where allowed (tests/test_cuda_paths.py checks its
# bits). benchmarks/decode_kernels.py on an H100 at bench-91m, through Decoder.start: 1K bytes 31-50 -> 6.1 ms,
# 8K bytes 30-56 -> 15.6 ms (BENCHMARKS.md, session 5); a bucket's first read captures its graph (a few eager
# reads' time, once per process). MAMBABYTE_GRAPH_PROMPTS=0 turns it off.
GRAPH_PROMPTS = os.environ.get("MAMBABYTE_GRAPH_PROMPTS", "1") != "0"
MIN_BUCKET, MAX_BUCKET = 64, 8192  # context lengths read in buckets: padded to a power of two in this range


def bucket(length: int) -> int:
    """The padded length a context of ``length`` bytes is read at: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def reads_in_buckets(ids: Tensor, longest: int) -> bool:
    """Whether ``ids`` (batch, length) is read in its bucket; ``longest``: the most positions one forward may
    read (memory)."""
    return GRAPH_PROMPTS and ids.is_cuda and bucket(ids.shape[1]) <= min(MAX_BUCKET, longest)


def left_padded(ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """ids (batch, length) -> (ids left-padded with zero bytes to the bucket, reset flags at the first real
    byte): the padding never reaches the state, as when ``Decoder.start`` pads a batch. A context that fills
    its bucket needs no flags (None): the scan runs ~10% faster without them."""
    batch, length = ids.shape
    padding = bucket(length) - length
    if not padding:
        return ids, None
    padded = torch.cat([ids.new_zeros(batch, padding), ids], dim=1)
    reset = torch.zeros(batch, padding + length, dtype=torch.bool, device=ids.device)
    reset[:, padding] = True
    return padded, reset


class PromptGraphs:
    """Reads bucketed contexts by replaying captured graphs: a forward over a 1K-byte prompt at bench-91m costs
    the host ~40 ms of per-op and per-launch work (1.7 ms a layer) for ~4 ms of GPU work (BENCHMARKS.md).
    One graph per (batch, bucket) is captured at its first use; they share a memory pool.
    """

    def __init__(self, forward: Callable[[Tensor, Tensor | None], tuple[Tensor, object]], device: torch.device,
                 capture: GraphCapture | None = None):
        """``forward(ids, reset)`` -> (the last position's logits, the state): what a graph replays."""
        self.forward = forward
        self.device = device
        self.capture = capture or GraphCapture()
        self._graphs: dict[tuple[int, int, bool], tuple[Tensor, Tensor | None, torch.cuda.CUDAGraph, tuple] | None] = {}
        self._pool = None

    def _captured(self, batch: int, length: int, has_reset: bool):
        key = batch, length, has_reset
        if key not in self._graphs:
            ids = torch.zeros(batch, length, dtype=torch.long, device=self.device)
            reset = torch.zeros(batch, length, dtype=torch.bool, device=self.device) if has_reset else None
            if has_reset:
                reset[:, 0] = True
            graph, outputs = self.capture(lambda: self.forward(ids, reset), self.device, pool=self._pool)
            self._graphs[key] = None if graph is None else (ids, reset, graph, outputs)
            if graph is not None:
                self._pool = graph.pool()
        return self._graphs[key]

    def read(self, ids: Tensor, reset: Tensor | None) -> tuple[Tensor, object] | None:
        """ids, reset (batch, length) or None -> (logits (batch, 256), state) as graph outputs (the next read
        overwrites them), or None where capture failed."""
        captured = self._captured(*ids.shape, reset is not None)
        if captured is None:
            return None
        ids_buffer, reset_buffer, graph, outputs = captured
        ids_buffer.copy_(ids)
        if reset is not None:
            reset_buffer.copy_(reset)
        graph.replay()
        return outputs

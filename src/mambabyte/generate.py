"""Generation: bytes sampled from any model of the contract, streamed, with the usual sampling controls.

How it runs:
- the context (the document-start separator, then the prompt) is read by the parallel forward from the
  initial state, in chunks that bound memory. Rows of different lengths are left-padded and flagged with
  ``reset`` at their true start, so padding never reaches a row's state; identical rows are read once;
- then one ``step()`` per byte: choose a byte from the next-byte logits, step the model on it. A Mamba's
  state has a fixed size, so memory does not grow with the number of bytes generated;
- on CUDA the whole step (model step and byte choice) is captured once in a CUDA graph and replayed.

Randomness is counter-based: a row's noise depends only on its seed, how many bytes it has chosen and
the byte value, so the same seed gives the same output and a row's output does not depend on the other
rows of its batch. Row i of a batch uses seed + i.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from mambabyte.cuda_graphs import PromptGraphs, left_padded, reads_in_buckets
from mambabyte.errors import UserError
from mambabyte.evaluate import DEFAULT_SEPARATOR
from mambabyte.ops.dispatch import resolve_backend
from mambabyte.utf8 import READY, advance, mask_tables

PREFILL_MEMORY = 1 << 30  # bytes of scan intermediates one prefill chunk may use
OUTPUT_BLOCK = 4096  # steps between two reads of the chosen bytes when nothing needs them sooner
STOP_CHECK_BLOCK = 64  # ... and when stop strings must be watched for


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's constants
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
_STEP_STRIDE = _int64(256 * _GOLDEN)


@dataclass(frozen=True)
class Sampling:
    """How the next byte is chosen from the logits; names and order of the filters follow HF transformers.

    repetition penalty -> temperature (0 = greedy) -> top-k -> top-p -> min-p, after the strict-UTF-8 mask.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 makes bytes already in the prompt or output less likely
    utf8: str = "any"  # "strict": only bytes that can continue valid UTF-8

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"--min-p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.utf8 not in ("any", "strict"):
            raise UserError(f"--utf8 must be 'any' or 'strict', got {self.utf8!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def penalize(self, logits: Tensor, seen: Tensor) -> Tensor:
        """Repetition penalty (CTRL / HF): logits of bytes already seen are divided (if > 0) or multiplied by it."""
        if self.repetition_penalty == 1:
            return logits
        penalized = torch.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
        return torch.where(seen, penalized, logits)

    def probs(self, logits: Tensor) -> Tensor:
        """logits (batch, 256) -> the sampling distribution (batch, 256) after temperature, top-k, top-p, min-p."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if 0 < self.top_k < probs.shape[-1]:
            kth = probs.topk(self.top_k, dim=-1).values[:, -1:]
            probs = probs.masked_fill(probs < kth, 0)
            probs = probs / probs.sum(-1, keepdim=True)
        if self.top_p < 1:
            ordered, order = probs.sort(dim=-1, descending=True)
            mass_before = ordered.cumsum(-1) - ordered
            ordered = ordered.masked_fill(mass_before >= self.top_p, 0)  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
            probs = probs / probs.sum(-1, keepdim=True)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), 0)
        return probs


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; right shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def exponential_noise(seed_keys: Tensor, counter: Tensor, byte_offsets: Tensor) -> Tensor:
    """Exp(1) noise (batch, 256): splitmix64 of stream ``seed_key`` at position counter * 256 + byte.

    ``byte_offsets`` = arange(256) * golden ratio (``byte_offsets()``). No generator state to carry, so it
    runs inside a CUDA graph; argmax(p / noise) is a sample of p (the exponential race, as Gumbel-max).
    """
    bits = _mix(seed_keys[:, None] + counter * _STEP_STRIDE + byte_offsets)
    uniform = ((bits >> 41).float() + (2**22 + 0.5)) * 2.0**-23  # top 23 bits, in (0, 1) exactly in fp32
    return -torch.log(uniform)


def byte_offsets(device=None) -> Tensor:
    return torch.tensor([_int64(byte * _GOLDEN) for byte in range(256)], device=device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on CUDA by default, full fp32 elsewhere (weight-cast cache off: CUDA graphs need it)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def _ids(rows: Sequence[bytes], device: torch.device) -> Tensor:
    """Rows of equal length -> (rows, length) long on ``device`` (moved as bytes: an 8K prompt costs no Python loop)."""
    joined = torch.from_numpy(np.frombuffer(b"".join(rows), dtype=np.uint8).copy())
    return joined.view(len(rows), -1).to(device).long()


def _same_shapes(a, b) -> bool:
    a_leaves, a_spec = tree_flatten(a)
    b_leaves, b_spec = tree_flatten(b)
    return a_spec == b_spec and all(x.shape == y.shape for x, y in zip(a_leaves, b_leaves))


def _is_mambabyte(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "arch", None) == "mambabyte"


def _prefill_bytes_per_position(model: nn.Module, device: torch.device) -> int:
    """Memory one more prompt position costs a forward, per row: the PyTorch scans keep
    (length, d_inner, d_state) intermediates, the compiled kernels only (length, d_inner) activations."""
    config = model.config
    d_inner, d_state = getattr(config, "d_inner", 1024), getattr(config, "d_state", 16)
    if _is_mambabyte(model) and resolve_backend(None, device) in ("triton", "cpu"):
        return d_inner * 32
    return d_inner * d_state * 16


_PROMPT_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, PromptGraphs)


def _prompt_graphs(model: nn.Module, dtype: torch.dtype | None) -> PromptGraphs:
    """The prompt graphs of ``model`` under ``dtype``'s autocast; new ones (the old dropped) if any parameter
    moved, since graphs read the weights at the addresses they were captured with."""
    parameters = list(model.parameters())
    key = dtype, parameters[0].device, parameters[0].dtype, tuple(p.data_ptr() for p in parameters)
    kept = _PROMPT_GRAPHS.get(model)
    if kept is None or kept[0] != key:
        model_ref = weakref.ref(model)  # the graphs must not keep their model alive

        def forward(ids: Tensor, reset: Tensor) -> tuple[Tensor, object]:
            with _autocast(ids.device, dtype):
                logits, state = model_ref()(ids, return_state=True, reset=reset)
            return logits[:, -1].float(), state

        kept = _PROMPT_GRAPHS[model] = key, PromptGraphs(forward, parameters[0].device)
    return kept[1]


@torch.no_grad()
def read_bytes(model: nn.Module, ids: Tensor, reset: Tensor | None = None, state=None,
               dtype: torch.dtype | None = None, graphs: bool = True) -> tuple[Tensor, object]:
    """ids (batch, length) read from ``state`` (None: the initial state) as decoding reads prompts: in chunks
    that bound memory, under the decoding autocast. -> (the next byte's logits (batch, 256) fp32, the state).

    With ``cuda_graphs.GRAPH_PROMPTS``, a MambaByte model reads a whole context from the initial state
    left-padded to its bucket (``cuda_graphs.left_padded``), from a CUDA graph unless ``graphs`` is False: the
    same bits either way. Anything that must decode exactly as ``Decoder`` does (speculative decoding) reads
    its context here."""
    if ids.shape[1] == 0:
        raise ValueError("read_bytes needs at least one byte")
    chunk = max(64, PREFILL_MEMORY // (ids.shape[0] * _prefill_bytes_per_position(model, ids.device)))
    # left padding moves no position in a MambaByte model (it would in a Transformer)
    if _is_mambabyte(model) and reset is None and state is None and reads_in_buckets(ids, chunk):
        ids, reset = left_padded(ids)
        read = _prompt_graphs(model, dtype).read(ids, reset) if graphs else None
        if read is not None:
            return read[0].clone(), tree_map(torch.clone, read[1])
    with _autocast(ids.device, dtype):
        for begin in range(0, ids.shape[1], chunk):
            window = slice(begin, begin + chunk)
            logits, state = model(ids[:, window], state=state, return_state=True,
                                  reset=None if reset is None else reset[:, window])
    # copies, so that no view keeps a whole chunk's logits or scan states alive
    return logits[:, -1].float().clone(), tree_map(torch.clone, state)


class Decoder:
    """Rows decoded in lockstep from one model: its state and next-byte logits, plus what sampling tracks
    (bytes seen, for the repetition penalty; the UTF-8 automaton; the random counter).

    ``start`` reads the first contexts, ``feed`` appends bytes to every row, ``decode`` chooses bytes.
    """

    def __init__(self, model: nn.Module, sampling: Sampling, seeds: Sequence[int], *, cuda_graph: bool = True,
                 dtype: torch.dtype | None = None):
        self.model = model
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.batch = len(seeds)
        self.dtype = dtype
        device = self.device
        self.seed_keys = _mix(torch.tensor(list(seeds), dtype=torch.long, device=device))
        self.byte_offsets = byte_offsets(device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # bytes chosen so far in every row
        self.budget = torch.zeros((), dtype=torch.long, device=device)  # bytes left in this decode call
        self.seen = torch.zeros(self.batch, 256, dtype=torch.bool, device=device)
        self.utf8_state = torch.full((self.batch,), READY, dtype=torch.long, device=device)
        self.utf8_allowed, self.utf8_next, self.utf8_left = mask_tables(device)
        self.chosen = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.logits: Tensor | None = None  # (batch, 256): the next byte's logits
        self.state = None
        self.bytes_read = 0  # context bytes read with forward(), padding not counted
        self._use_graph = cuda_graph and device.type == "cuda"
        self._graph = None

    @torch.no_grad()
    def start(self, prompts: Sequence[bytes], separator: bytes = DEFAULT_SEPARATOR) -> None:
        """Reads ``separator + prompt`` into each row from the initial state."""
        if len(prompts) != self.batch:
            raise ValueError(f"{len(prompts)} prompts for a batch of {self.batch}")
        contexts = [separator + prompt for prompt in prompts]
        if len(set(contexts)) == 1:  # e.g. several samples of one prompt: read it once
            logits, state = self._read(_ids(contexts[:1], self.device), None, None)
            expand = lambda t: t.expand(self.batch, *t.shape[1:]).contiguous()  # noqa: E731
            logits, state = expand(logits), tree_map(expand, state)
            self.bytes_read += len(contexts[0])
        else:
            length = max(map(len, contexts))
            padded = [bytes(length - len(c)) + c for c in contexts]
            reset = torch.zeros(self.batch, length, dtype=torch.bool, device=self.device)
            for row, context in enumerate(contexts):
                reset[row, length - len(context)] = True  # the row's state starts here: padding never leaks in
            logits, state = self._read(_ids(padded, self.device), reset, None)
            self.bytes_read += sum(map(len, contexts))
        self._keep(logits, state)
        self.seen.zero_()
        for row, prompt in enumerate(prompts):
            self.seen[row, list(set(prompt))] = True
            self.utf8_state[row] = advance(READY, prompt)

    @torch.no_grad()
    def feed(self, data: bytes) -> None:
        """Appends the same bytes to every row (a chat turn): only these bytes are read."""
        if not data:
            return
        logits, state = self._read(_ids([data] * self.batch, self.device), None, self.state)
        self.bytes_read += len(data) * self.batch
        self._keep(logits, state)
        self.seen[:, list(set(data))] = True
        states = [advance(state, data) for state in self.utf8_state.tolist()]
        self.utf8_state.copy_(torch.tensor(states, device=self.device))

    def _read(self, ids: Tensor, reset: Tensor | None, state):
        return read_bytes(self.model, ids, reset, state, self.dtype, graphs=self._use_graph)

    def compute(self):
        return _autocast(self.device, self.dtype)

    def _keep(self, logits: Tensor, state) -> None:
        """The new logits and state; a captured graph reads them from fixed buffers, so copy there."""
        if self._graph is None:
            self.logits, self.state = logits, state
        else:
            self.logits.copy_(logits)
            tree_map(lambda buffer, value: buffer.copy_(value), self.state, state)

    def _choose(self) -> Tensor:
        """The next byte of every row (batch,), and the bookkeeping that follows it; no host sync."""
        sampling = self.sampling
        logits = self.logits
        if sampling.utf8 == "strict":
            allowed = self.utf8_allowed[self.utf8_state]
            # begin a character only if it can end within the budget, so the output ends on a whole one
            fits = (self.utf8_left[self.utf8_state] < self.budget) | (self.utf8_state != READY)[:, None]
            logits = logits.masked_fill(~(allowed & fits), -math.inf)
        logits = sampling.penalize(logits, self.seen)
        if sampling.greedy:
            chosen = logits.argmax(-1)
        else:
            noise = exponential_noise(self.seed_keys, self.counter, self.byte_offsets)
            chosen = (sampling.probs(logits) / noise).argmax(-1)
        if sampling.repetition_penalty != 1:
            self.seen.scatter_(1, chosen[:, None], True)
        if sampling.utf8 == "strict":
            self.utf8_state.copy_(self.utf8_next[self.utf8_state, chosen])
        self.counter += 1
        self.budget -= 1
        return chosen

    def _step(self, in_place: bool) -> None:
        chosen = self._choose()
        self.chosen.copy_(chosen)
        if in_place and hasattr(self.model, "step_"):  # the model writes its next state over the buffers itself
            self.logits.copy_(self.model.step_(chosen, self.state))
            return
        logits, state = self.model.step(chosen, self.state)
        if in_place:
            self.logits.copy_(logits)
            tree_map(lambda buffer, value: buffer.copy_(value), self.state, state)
        else:
            self.logits, self.state = logits.float(), state

    def _capture(self):
        """One decoding step as a CUDA graph, or None where the model's state changes shape (a KV cache)."""
        buffers = [self.logits, self.chosen, self.counter, self.budget, self.seen, self.utf8_state,
                   *tree_flatten(self.state)[0]]
        saved = [buffer.clone() for buffer in buffers]
        try:
            with self.compute():
                if not _same_shapes(self.state, self.model.step(self.chosen, self.state)[1]):
                    return None
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up outside the graph (allocations, autotuning)
                        self._step(in_place=True)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step(in_place=True)
            return graph
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture failed, decoding without it: {str(error).splitlines()[0]}")
            return None
        finally:
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)

    @torch.no_grad()
    def decode(self, max_bytes: int) -> Iterator[Tensor]:
        """Chooses up to ``max_bytes`` bytes per row; yields each step's bytes (batch,) on the device.

        The yielded tensor is reused: read it before asking for the next one. Stopping early is fine.
        """
        if self.state is None:
            raise RuntimeError("call start() before decode()")
        self.budget.fill_(max_bytes)
        if self._use_graph and self._graph is None and max_bytes > 0:
            self.logits = self.logits.float().contiguous()
            self._graph = self._capture()
            self._use_graph = self._graph is not None
        for _ in range(max_bytes):
            if self._graph is not None:
                self._graph.replay()
            else:
                with self.compute():
                    self._step(in_place=False)
            yield self.chosen


class StopFilter:
    """One row's output with stop strings cut out: holds back bytes that may begin a stop string."""

    def __init__(self, stops: Sequence[bytes]):
        self.stops = [bytes(stop) for stop in stops]
        self.pending = b""
        self.stopped = False

    def push(self, data: bytes) -> bytes:
        """The bytes that can be output now; sets ``stopped`` (and drops the rest) at a stop string."""
        if self.stopped:
            return b""
        text = self.pending + data
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped, self.pending = True, b""
            return text[:min(found)]
        held = next((k for k in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(stop.startswith(text[-k:]) for stop in self.stops)), 0)
        self.pending = text[len(text) - held:]
        return text[:len(text) - held]

    def flush(self) -> bytes:
        """What was held back, at the end of the output."""
        pending, self.pending = self.pending, b""
        return pending


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def check_stops(stop: Sequence[bytes | str]) -> list[bytes]:
    if isinstance(stop, (bytes, str)):
        stop = [stop]
    stops = [_as_bytes(s) for s in stop]
    if any(not s for s in stops):
        raise UserError("--stop strings must not be empty")
    return stops


def stream_rows(decoder: Decoder, max_bytes: int, stop: Sequence[bytes | str] = (),
                block: int = 1) -> Iterator[tuple[int, bytes]]:
    """Decodes up to ``max_bytes`` per row; yields (row, bytes) as they become final, stop strings excluded.

    The chosen bytes are read from the device every ``block`` steps (1 = as generated). With block 1 the
    decoding ends right after the last stop string completes, so the state has read exactly the output
    and the stop string.
    """
    if max_bytes < 0:
        raise UserError(f"--max-bytes must be >= 0, got {max_bytes}")
    stops = check_stops(stop)  # checked now, not at the first byte
    return _stream_rows(decoder, max_bytes, [StopFilter(stops) for _ in range(decoder.batch)], block)


def _stream_rows(decoder: Decoder, max_bytes: int, filters: list[StopFilter], block: int
                 ) -> Iterator[tuple[int, bytes]]:
    live = list(range(decoder.batch))
    steps = decoder.decode(max_bytes)
    done = 0
    try:
        while live and done < max_bytes:
            count = min(block, max_bytes - done)
            chosen = torch.empty(decoder.batch, count, dtype=torch.uint8, device=decoder.device)
            for column, step_bytes in zip(range(count), steps):
                chosen[:, column] = step_bytes
            rows = chosen.cpu().numpy()
            done += count
            for row in live:
                out = filters[row].push(rows[row].tobytes())
                if out:
                    yield row, out
            live = [row for row in live if not filters[row].stopped]
    finally:
        steps.close()
    for row in live:
        tail = filters[row].flush()
        if tail:
            yield row, tail


def _decoder(model: nn.Module, prompts: Sequence[bytes | str], seed: int, separator: bytes, cuda_graph: bool,
             dtype: torch.dtype | None, sampling: dict) -> Decoder:
    if not prompts:
        raise UserError("no prompts to continue")
    decoder = Decoder(model, Sampling(**sampling), [seed + row for row in range(len(prompts))],
                      cuda_graph=cuda_graph, dtype=dtype)
    decoder.start([_as_bytes(prompt) for prompt in prompts], separator)
    return decoder


def generate_batch(model: nn.Module, prompts: Sequence[bytes | str], max_bytes: int = 256, *, seed: int = 0,
                   stop: Sequence[bytes | str] = (), separator: bytes = DEFAULT_SEPARATOR, cuda_graph: bool = True,
                   dtype: torch.dtype | None = None, **sampling) -> list[bytes]:
    """Continues every prompt (row i with seed + i); each row gets exactly what it would get alone.

    ``sampling``: the fields of ``Sampling`` (temperature, top_k, top_p, min_p, repetition_penalty, utf8).
    """
    decoder = _decoder(model, prompts, seed, separator, cuda_graph, dtype, sampling)
    block = STOP_CHECK_BLOCK if stop else OUTPUT_BLOCK
    outputs = [bytearray() for _ in prompts]
    for row, chunk in stream_rows(decoder, max_bytes, stop, block):
        outputs[row] += chunk
    return [bytes(output) for output in outputs]


def generate(model: nn.Module, prompt: bytes | str = b"", max_bytes: int = 256, **options) -> bytes:
    """The bytes that continue ``prompt``; options as in ``generate_batch``."""
    return generate_batch(model, [prompt], max_bytes, **options)[0]


def generate_text(model: nn.Module, prompt: bytes | str = "", max_bytes: int = 256, **options) -> str:
    """``generate`` decoded as UTF-8, invalid sequences shown as U+FFFD."""
    return generate(model, prompt, max_bytes, **options).decode("utf-8", errors="replace")


def stream(model: nn.Module, prompt: bytes | str = b"", max_bytes: int = 256, *, seed: int = 0,
           stop: Sequence[bytes | str] = (), separator: bytes = DEFAULT_SEPARATOR, cuda_graph: bool = True,
           dtype: torch.dtype | None = None, **sampling) -> Iterator[bytes]:
    """Yields the continuation of ``prompt`` in chunks of bytes as they are generated."""
    decoder = _decoder(model, [prompt], seed, separator, cuda_graph, dtype, sampling)
    for _, chunk in stream_rows(decoder, max_bytes, stop):
        yield chunk


def utf8_text_chunks(chunks: Iterator[bytes]) -> Iterator[str]:
    """Text of a byte stream: a character appears once complete, invalid sequences as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


class Conversation:
    """A dialogue with one model whose state is kept between turns: a turn reads only its own new bytes."""

    def __init__(self, model: nn.Module, *, seed: int = 0, separator: bytes = DEFAULT_SEPARATOR,
                 cuda_graph: bool = True, dtype: torch.dtype | None = None, **sampling):
        self.decoder = _decoder(model, [b""], seed, separator, cuda_graph, dtype, sampling)

    @property
    def bytes_read(self) -> int:
        """Bytes the model has read with forward() so far (the separator and every message)."""
        return self.decoder.bytes_read

    def reply(self, message: bytes | str, max_bytes: int = 256, stop: Sequence[bytes | str] = (b"\n",)
              ) -> Iterator[bytes]:
        """Reads ``message``, then yields the reply in chunks; the reply and its stop string stay in the state."""
        chunks = stream_rows(self.decoder, max_bytes, stop)
        self.decoder.feed(_as_bytes(message))
        for _, chunk in chunks:
            yield chunk

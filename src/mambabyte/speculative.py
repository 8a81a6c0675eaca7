"""Speculative decoding across vocabularies: a subword model drafts, the byte model verifies.

The byte model has read everything written except the last byte, ``carry``. One round:
1. the drafter proposes ``draft_len`` subword tokens greedily from its state: new bytes d;
2. the byte model reads ``carry`` + d in ONE call (``forward_states``) from its state, giving its prediction
   for every byte of d and one past it, and its state after every position;
3. the longest prefix of d it agrees with is kept and it supplies the byte after it (its correction where
   they part, or a bonus byte when all of d was kept): the next ``carry``, read at the next round;
4. the byte model rolls back to its state after the kept prefix (``state_at``, nothing re-read); the
   drafter rolls back to its state after the last whole token it got right and reads the re-tokenised tail.

A round costs one byte-model call and one transfer from the device for the verdict, and yields the kept
bytes plus one. Greedy decoding gives exactly the byte model's greedy output. With sampling, a drafted
byte x is kept with probability p(x) (the byte model's probability, after temperature/top-k/top-p/min-p),
and on rejection the byte is drawn from p with x removed and renormalised: since the draft does not depend
on the verifier's coins, this is speculative sampling with a point-mass proposal and the output follows p.

On CUDA both models run from fixed buffers and replay CUDA graphs (an eager call there is one kernel launch
after another, bound by the CPU): the drafter one graph for a whole draft and one for reading a token, the
byte model one graph per span length up to ``MAX_GRAPH_SPAN``, captured when first needed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from mambabyte.checkpoint import load_pretrained
from mambabyte.errors import UserError
from mambabyte.evaluate import DEFAULT_SEPARATOR
from mambabyte.generate import Sampling, StopFilter, _same_shapes, check_stops
from mambabyte.subword import TOKENIZER_FILE, SubwordTokenizer

MAX_GRAPH_SPAN = 64  # longest span the byte model reads by replaying a graph; longer ones (rare) run eagerly


@dataclass
class SpeculativeStats:
    """What decoding did. ``byte_model_calls``: calls while decoding (one per round), the prompt's read not counted."""

    rounds: int = 0
    drafted_bytes: int = 0
    accepted_bytes: int = 0
    generated_bytes: int = 0
    byte_model_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_bytes / max(1, self.drafted_bytes)

    @property
    def bytes_per_call(self) -> float:
        return self.generated_bytes / max(1, self.byte_model_calls)


def _on_device(values: Sequence[int], device: torch.device) -> Tensor:
    """A LongTensor of ``values``; to a GPU from pinned memory, so the host does not wait for the copy."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _ids(data: bytes | list[int], device) -> Tensor:
    return _on_device(list(data), device)[None]


CopyPlan = list[tuple[list[Tensor], list[Tensor]]]


def _copy_plan(buffers, values) -> CopyPlan:
    """Copies of the pytree ``values`` over the pytree of contiguous tensors ``buffers``: (buffers, values) lists
    per dtype pair, for ``_run_copies``. Built once for copies that recur (Python views cost microseconds each)."""
    plan: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for buffer, value in zip(tree_flatten(buffers)[0], tree_flatten(values)[0]):
        if value.is_contiguous():  # the buffer's strides (``state_at``'s views keep the span's), for the fast kernel
            value = value.view(-1).view(buffer.shape)
        destinations, sources = plan.setdefault((buffer.dtype, value.dtype), ([], []))
        destinations.append(buffer)
        sources.append(value)
    return list(plan.values())


def _run_copies(plan: CopyPlan) -> None:
    """On the device, no sync: one multi-tensor kernel per dtype pair rather than one kernel per tensor."""
    for destinations, sources in plan:
        torch._foreach_copy_(destinations, sources)


def _copy(buffers, values) -> None:
    """Writes the pytree ``values`` over the pytree of contiguous tensors ``buffers``."""
    _run_copies(_copy_plan(buffers, values))


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
            warnings.warn(f"CUDA graph capture failed, speculative decoding goes on without it: "
                          f"{str(error).splitlines()[0]}")
            self.failed = True
            return None, None
        finally:
            for tensor, value in zip(restore, saved):
                tensor.copy_(value)


class DraftDecoder:
    """The drafter decoding greedily: its state and next-token logits (vocab,); drafts tokens and rolls back
    to its state before any of them."""

    def __init__(self, model: nn.Module, draft_len: int):
        self.model = model
        self.draft_len = draft_len
        self.device = next(model.parameters()).device
        self.state = None
        self.logits: Tensor | None = None
        self._states: list = []  # after each drafted token (the first: before them)
        self._logits: list[Tensor] = []

    def _forward(self, ids: list[int], state) -> tuple[Tensor, object]:
        logits, state = self.model(_ids(ids, self.device), state=state, return_state=True)
        return logits[0, -1], state

    def start(self, ids: list[int]) -> None:
        """Reads ``ids`` (at least one) from the initial state."""
        self.logits, self.state = self._forward(ids, self.model.init_state(1))

    def read(self, ids: list[int]) -> None:
        """Reads ``ids`` (at least one) from the current state."""
        self.logits, self.state = self._forward(ids, self.state)

    def draft(self, first_allowed: Tensor) -> list[int]:
        """``draft_len`` greedy tokens, the first among ``first_allowed`` (vocab,) bool; the state moves past them.

        Tokens are chosen on the device and transferred once, at the end."""
        state, logits = self.state, self.logits
        self._states, self._logits, tokens = [state], [logits], []
        token = logits.masked_fill(~first_allowed, -torch.inf).argmax()
        for index in range(self.draft_len):
            if index:
                token = logits.argmax()
            step_logits, state = self.model.step(token.view(1), state)
            logits = step_logits[0]
            tokens.append(token)
            self._states.append(state)
            self._logits.append(logits)
        self.state, self.logits = state, logits
        return torch.stack(tokens).tolist()

    def rollback(self, whole: int) -> None:
        """Back to the state after the first ``whole`` tokens of the last draft."""
        self.state, self.logits = self._states[whole], self._logits[whole]


class GraphDraftDecoder(DraftDecoder):
    """``DraftDecoder`` on fixed buffers, replaying two CUDA graphs: a whole draft, and reading one token.

    The draft graph copies the state after each token into per-token buffers, for ``rollback``. Where capture
    fails the same code runs eagerly on the buffers.
    """

    def __init__(self, model: nn.Module, draft_len: int, vocab_size: int, capture: GraphCapture):
        super().__init__(model, draft_len)
        device = self.device
        self.state = model.init_state(1)
        self.logits = torch.zeros(vocab_size, device=device)
        self._token = torch.zeros(1, dtype=torch.long, device=device)  # the token ``read`` feeds its graph
        self._first_allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self._tokens = torch.zeros(draft_len, dtype=torch.long, device=device)
        self._states = [tree_map(torch.clone, self.state) for _ in range(draft_len + 1)]
        self._logits = torch.zeros(draft_len + 1, vocab_size, device=device)
        self._rollbacks = [_copy_plan(self.state, state) for state in self._states]
        self._capture = capture
        self._graphs: dict[str, torch.cuda.CUDAGraph | None] | None = None  # captured at the first use

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether ``model``'s state keeps its shape from step to step (not a growing cache), so buffers can hold it."""
        if hasattr(model, "step_"):
            return True
        device = next(model.parameters()).device
        state = model.init_state(1)
        return _same_shapes(state, model.step(torch.zeros(1, dtype=torch.long, device=device), state)[1])

    def _step(self, token: Tensor) -> None:
        """token (1,): the state and logits buffers move past it."""
        if hasattr(self.model, "step_"):
            self.logits.copy_(self.model.step_(token, self.state)[0])
            return
        logits, state = self.model.step(token, self.state)
        self.logits.copy_(logits[0])
        _copy(self.state, state)

    def _keep(self, index: int) -> None:
        _copy(self._states[index], self.state)
        self._logits[index].copy_(self.logits)

    def _draft_body(self) -> None:
        self._keep(0)
        token = self.logits.masked_fill(~self._first_allowed, -torch.inf).argmax().view(1)
        for index in range(self.draft_len):
            if index:
                token = self.logits.argmax().view(1)
            self._tokens[index:index + 1].copy_(token)
            self._step(token)
            self._keep(index + 1)

    def _read_body(self) -> None:
        self._step(self._token)

    def _run(self, name: str, body: Callable[[], None]) -> None:
        if self._graphs is None:
            restore = [self.logits, *tree_flatten(self.state)[0]]
            self._graphs = {key: self._capture(fn, self.device, restore)[0]
                            for key, fn in (("draft", self._draft_body), ("read", self._read_body))}
        graph = self._graphs[name]
        if graph is None:
            body()
        else:
            graph.replay()

    def start(self, ids: list[int]) -> None:
        logits, state = self._forward(ids, self.model.init_state(1))
        self.logits.copy_(logits)
        _copy(self.state, state)

    def read(self, ids: list[int]) -> None:
        ids_on_device = _on_device(ids, self.device)
        for index in range(len(ids)):
            self._token.copy_(ids_on_device[index:index + 1])
            self._run("read", self._read_body)

    def draft(self, first_allowed: Tensor) -> list[int]:
        self._first_allowed.copy_(first_allowed)
        self._run("draft", self._draft_body)
        return self._tokens.tolist()

    def rollback(self, whole: int) -> None:
        _run_copies(self._rollbacks[whole])
        self.logits.copy_(self._logits[whole])


class ByteVerifier:
    """The byte model's state; reads a span keeping its state after every position, and rolls back to any."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.state = None
        self._states = None  # after every position of the last span

    def _prefill(self, context: bytes):
        state = self.model.init_state(1)
        if context:
            _, state = self.model(_ids(context, self.device), state=state, return_state=True)
        return state

    def start(self, context: bytes) -> None:
        """Reads ``context`` (may be empty) from the initial state."""
        self.state = self._prefill(context)

    def read(self, span: bytes) -> Tensor:
        """-> logits (len(span), 256): after each byte of ``span`` read from the state (which stays as it is)."""
        logits, self._states = self.model.forward_states(_ids(span, self.device), self.state)
        return logits[0]

    def rollback(self, position: int) -> None:
        """To the state after ``position`` (0-based) of the last span."""
        self.state = self.model.state_at(self._states, position)


class GraphByteVerifier(ByteVerifier):
    """``ByteVerifier`` from a fixed state buffer, replaying one CUDA graph per span length (up to
    ``MAX_GRAPH_SPAN``). The graphs share one memory pool: a replay's outputs are read before the next one."""

    def __init__(self, model: nn.Module, capture: GraphCapture):
        super().__init__(model)
        self.state = model.init_state(1)
        self._capture = capture
        self._graphs: dict[int, tuple[Tensor, torch.cuda.CUDAGraph, tuple[Tensor, list]]] = {}
        self._pool = None
        self._rollbacks: dict[tuple[int, int], CopyPlan] = {}  # (span length, position) -> copies from its graph
        self._length: int | None = None  # of the last span, when a graph read it

    def start(self, context: bytes) -> None:
        _copy(self.state, self._prefill(context))

    def _graph(self, length: int):
        """(ids buffer (1, length), graph, its outputs) for spans of ``length``, captured on first use; or None."""
        if length not in self._graphs and length <= MAX_GRAPH_SPAN and not self._capture.failed:
            ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
            graph, outputs = self._capture(lambda: self.model.forward_states(ids, self.state), self.device,
                                           pool=self._pool)
            if graph is not None:
                self._graphs[length] = ids, graph, outputs
                self._pool = graph.pool()
        return self._graphs.get(length)

    def read(self, span: bytes) -> Tensor:
        captured = self._graph(len(span))
        self._length = None if captured is None else len(span)
        if captured is None:
            return super().read(span)
        ids, graph, (logits, self._states) = captured
        ids.copy_(torch.tensor([list(span)], dtype=torch.long, pin_memory=True), non_blocking=True)
        graph.replay()
        return logits[0]

    def rollback(self, position: int) -> None:
        if self._length is None:
            _copy(self.state, self.model.state_at(self._states, position))
            return
        key = self._length, position
        if key not in self._rollbacks:
            self._rollbacks[key] = _copy_plan(self.state, self.model.state_at(self._states, position))
        _run_copies(self._rollbacks[key])


class SpeculativeDecoder:
    """Generates with ``byte_model`` (vocab 256) while ``drafter`` (vocab of ``tokenizer``) proposes.

    ``probs``: maps byte logits (rows, 256) to the sampling distributions (rows, 256); None means greedy.
    The byte model must keep its state after every position of a span (``forward_states``, ``state_at``).
    ``cuda_graph``: on CUDA, replay CUDA graphs (same output; see the module's docstring).
    """

    def __init__(self, byte_model, drafter, tokenizer: SubwordTokenizer, draft_len: int = 4,
                 probs: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
                 cuda_graph: bool = True):
        if not hasattr(byte_model, "forward_states"):
            arch = getattr(getattr(byte_model, "config", None), "arch", type(byte_model).__name__)
            raise UserError(f"speculative decoding needs a MambaByte byte model (state after every position); "
                            f"{arch} has none")
        self.byte_model = byte_model
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.draft_len = draft_len
        self.probs = probs
        self.generator = generator
        self.stats = SpeculativeStats()
        self.device = next(byte_model.parameters()).device
        self.drafter_device = next(drafter.parameters()).device
        self._healing: dict[bytes, Tensor] = {}
        capture = GraphCapture()  # shared: after a failed capture, neither model tries again
        with torch.no_grad():
            graph_drafter = cuda_graph and self.drafter_device.type == "cuda" and GraphDraftDecoder.applies(drafter)
        self.draft_decoder = (GraphDraftDecoder(drafter, draft_len, tokenizer.vocab_size, capture) if graph_drafter
                              else DraftDecoder(drafter, draft_len))
        self.verifier = (GraphByteVerifier(byte_model, capture) if cuda_graph and self.device.type == "cuda"
                         else ByteVerifier(byte_model))

    def _verify(self, logits: Tensor, piece: bytes) -> tuple[int, int]:
        """logits (len(piece) + 1, 256): the byte model's view before each drafted byte and past the last.

        -> (how many bytes of ``piece`` it keeps, the byte it writes after them); one transfer from the device.
        """
        if self.probs is None:
            best = logits.argmax(-1).tolist()
            kept = next((i for i, (byte, drafted) in enumerate(zip(best, piece)) if byte != drafted), len(piece))
            return kept, best[kept]
        p = self.probs(logits)
        rows = torch.arange(len(piece), device=p.device)
        drafted = _on_device(list(piece), p.device)
        coins = torch.rand(len(piece), generator=self.generator, device=p.device)
        accepted = coins < p[rows, drafted]
        residual = p.index_put((rows, drafted), torch.zeros((), dtype=p.dtype, device=p.device))  # the last row stays p
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # x had all the mass: always kept
        replacements = torch.multinomial(residual, 1, generator=self.generator)[:, 0]
        verdict = torch.cat([accepted.long(), replacements]).tolist()
        kept = next((i for i in range(len(piece)) if not verdict[i]), len(piece))
        return kept, verdict[len(piece) + kept]

    def _continuations(self, pending: bytes) -> Tensor:
        """Mask (vocab,) of the tokens whose bytes start with ``pending`` (token healing), cached."""
        if pending not in self._healing:
            allowed = [token.startswith(pending) for token in self.tokenizer.token_bytes]
            self._healing[pending] = torch.tensor(allowed, device=self.drafter_device)
        return self._healing[pending]

    def _draft(self, pending: bytes) -> tuple[list[int], bytes]:
        """The drafter's tokens and the new bytes they bring. The first token must start with ``pending`` (bytes
        already written but not yet read by the drafter), so the drafter never has to continue from inside a token."""
        tokens = self.draft_decoder.draft(self._continuations(pending))
        return tokens, self.tokenizer.decode(tokens)[len(pending):]

    def _drafter_start(self, context: bytes) -> bytes:
        """The drafter reads ``context`` but its last token (if it has more than one): -> the pending bytes."""
        ids = self.tokenizer.encode(context)
        if len(ids) == 1:
            self.draft_decoder.start(ids)
            return b""
        self.draft_decoder.start(ids[:-1])
        return self.tokenizer.token_bytes[ids[-1]]

    def _drafter_resync(self, tokens: list[int], text: bytes, agreed: int) -> bytes:
        """After a round: the drafter keeps its whole tokens within the first ``agreed`` bytes of ``text`` and reads
        the rest of ``text`` but its last token, which stays pending: -> the pending bytes.

        ``text``: the pending bytes, then the round's new bytes; the first ``agreed`` are the drafter's own.
        """
        whole, length = 0, 0
        while whole < len(tokens) and length + len(self.tokenizer.token_bytes[tokens[whole]]) <= agreed:
            length += len(self.tokenizer.token_bytes[tokens[whole]])
            whole += 1
        self.draft_decoder.rollback(whole)
        ids = self.tokenizer.encode(text[length:])
        if len(ids) > 1:
            self.draft_decoder.read(ids[:-1])
        return self.tokenizer.token_bytes[ids[-1]]

    @torch.no_grad()
    def stream(self, context: bytes, max_bytes: int) -> Iterator[bytes]:
        """Continues ``context`` (the document-start separator plus the prompt); yields each round's bytes."""
        if not context:
            raise UserError("speculative decoding needs a context: a document separator or a prompt")
        self.verifier.start(context[:-1])
        carry = context[-1]  # written, not yet read by the byte model
        pending = self._drafter_start(context)
        produced = 0
        while produced < max_bytes:
            tokens, piece = self._draft(pending)
            piece = piece[: max_bytes - produced - 1]  # the round adds one byte of its own
            logits = self.verifier.read(bytes([carry]) + piece)
            kept, carry = self._verify(logits, piece)
            self.verifier.rollback(kept)  # after the old carry and the kept bytes
            new = piece[:kept] + bytes([carry])
            produced += len(new)
            self.stats.rounds += 1
            self.stats.byte_model_calls += 1
            self.stats.drafted_bytes += len(piece)
            self.stats.accepted_bytes += kept
            self.stats.generated_bytes += len(new)
            yield new
            if produced < max_bytes:
                pending = self._drafter_resync(tokens, pending + new, len(pending) + kept)

    def generate(self, context: bytes, max_bytes: int) -> bytes:
        """``stream`` joined."""
        return b"".join(self.stream(context, max_bytes))


def load_drafter(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, SubwordTokenizer]:
    """A subword model checkpoint: the model and the tokenizer saved beside it."""
    tokenizer = SubwordTokenizer.load(directory) if (Path(directory) / TOKENIZER_FILE).is_file() else None
    if tokenizer is None:
        raise UserError(f"{directory} is not a subword drafter: it has no {TOKENIZER_FILE}")
    model = load_pretrained(directory, device=device)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"drafter {directory}: model vocabulary {model.config.vocab_size} != tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer


def speculative_stream(byte_model: nn.Module, drafter: nn.Module, tokenizer: SubwordTokenizer,
                       prompt: bytes | str = b"", max_bytes: int = 256, *, draft_len: int = 4, seed: int = 0,
                       stop: Sequence[bytes | str] = (), separator: bytes = DEFAULT_SEPARATOR,
                       stats: SpeculativeStats | None = None, cuda_graph: bool = True, **sampling
                       ) -> Iterator[bytes]:
    """Like ``generate.stream``, but drafted by ``drafter``; the same output as plain decoding when greedy.

    ``sampling``: temperature, top_k, top_p, min_p (repetition penalty and strict UTF-8 are not supported).
    ``stats``: filled in as decoding goes (acceptance rate, bytes per byte-model call).
    ``cuda_graph``: on CUDA, replay both models' calls as CUDA graphs (the same output, faster).
    """
    if draft_len < 1:
        raise UserError(f"--draft-len must be >= 1, got {draft_len}")
    rules = Sampling(**sampling)
    if rules.repetition_penalty != 1 or rules.utf8 != "any":
        raise UserError("speculative decoding supports temperature, top-k, top-p and min-p only")
    if max_bytes < 0:
        raise UserError(f"--max-bytes must be >= 0, got {max_bytes}")
    generator = torch.Generator(device=next(byte_model.parameters()).device).manual_seed(seed)
    probs = None if rules.greedy else rules.probs
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, probs, generator, cuda_graph)
    if stats is not None:
        decoder.stats = stats
    stops = StopFilter(check_stops(stop))
    prompt = prompt.encode() if isinstance(prompt, str) else bytes(prompt)
    for chunk in decoder.stream(separator + prompt, max_bytes):
        out = stops.push(chunk)
        if out:
            yield out
        if stops.stopped:
            return
    tail = stops.flush()
    if tail:
        yield tail

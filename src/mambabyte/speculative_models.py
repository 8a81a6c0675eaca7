"""The two models of speculative decoding as decoding loops see them (src/mambabyte/speculative.py drives them).

``DraftDecoder``: the subword drafter decoding greedily, drafting k tokens and rolling back to any of them.
``ByteVerifier``: the byte model reading a span with its state after every position, rolling back to any.
Their ``Graph*`` versions hold everything in fixed buffers and replay CUDA graphs: an eager call on a GPU is one
kernel launch after another, bound by the CPU. The drafter has one graph for a whole draft and one for reading a
token, the byte model one graph per span length up to ``MAX_GRAPH_SPAN``, captured when first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from mambabyte.cuda_graphs import GraphCapture
from mambabyte.generate import _autocast, _same_shapes, read_bytes

MAX_GRAPH_SPAN = 64  # longest span the byte model reads by replaying a graph; longer ones (rare) run eagerly


def on_device(values: Sequence[int], device: torch.device) -> Tensor:
    """A LongTensor of ``values``; to a GPU from pinned memory, so the host does not wait for the copy."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _ids(data: bytes | list[int], device) -> Tensor:
    return on_device(list(data), device)[None]


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
        ids_on_device = on_device(ids, self.device)
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
    """The byte model's state; reads a span keeping its state after every position, and rolls back to any.

    Reads run as ``Decoder``'s do (its prompt reading, its autocast for ``dtype``), so that greedy speculative
    decoding writes what plain decoding writes, bit for bit, in bf16 too."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.state = None
        self._states = None  # after every position of the last span

    def start(self, context: bytes) -> Tensor:
        """Reads ``context`` (at least one byte) from the initial state; -> the next byte's logits (256,)."""
        logits, self.state = read_bytes(self.model, _ids(context, self.device), dtype=self.dtype, graphs=False)
        return logits[0]

    def _forward_states(self, ids: Tensor):
        with _autocast(self.device, self.dtype):
            return self.model.forward_states(ids, self.state)

    def read(self, span: bytes) -> Tensor:
        """-> logits (len(span), 256): after each byte of ``span`` read from the state (which stays as it is)."""
        logits, self._states = self._forward_states(_ids(span, self.device))
        return logits[0]

    def rollback(self, position: int) -> None:
        """To the state after ``position`` (0-based) of the last span."""
        self.state = self.model.state_at(self._states, position)


class GraphByteVerifier(ByteVerifier):
    """``ByteVerifier`` from a fixed state buffer, replaying one CUDA graph per span length (up to
    ``MAX_GRAPH_SPAN``). The graphs share one memory pool: a replay's outputs are read before the next one."""

    def __init__(self, model: nn.Module, capture: GraphCapture, dtype: torch.dtype | None = None):
        super().__init__(model, dtype)
        self._capture = capture
        self._graphs: dict[int, tuple[Tensor, torch.cuda.CUDAGraph, tuple[Tensor, list]]] = {}
        self._pool = None
        self._rollbacks: dict[tuple[int, int], CopyPlan] = {}  # (span length, position) -> copies from its graph
        self._length: int | None = None  # of the last span, when a graph read it

    def start(self, context: bytes) -> Tensor:
        logits, state = read_bytes(self.model, _ids(context, self.device), dtype=self.dtype)
        if self.state is None:  # the buffer takes the dtypes a read gives (bf16 conv window under bf16 autocast)
            self.state = state
        else:
            _copy(self.state, state)
        return logits[0]

    def _graph(self, length: int):
        """(ids buffer (1, length), graph, its outputs) for spans of ``length``, captured on first use; or None."""
        if length not in self._graphs and length <= MAX_GRAPH_SPAN and not self._capture.failed:
            ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
            graph, outputs = self._capture(lambda: self._forward_states(ids), self.device,
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

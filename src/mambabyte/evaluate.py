"""Bits per byte (BPB) of a byte model on whole documents, and how it changes with position in a document.

Every document is scored from a fresh state: the model first reads the separator (what it saw between
documents in training) and then predicts each byte of the document from all bytes before it. Two ways:

- ``stride=None`` (state carrying): the document is read in windows of ``window`` bytes and the recurrent
  state is carried from one window to the next, so a Mamba never loses context. For any model of the
  contract this equals one forward pass over the whole document; ``window`` only bounds memory.
- ``stride=S`` (sliding window, the paper's evaluation of Transformers): windows of ``window`` bytes start
  every ``S`` bytes, each one from scratch (no state), and score only the bytes not scored yet, so every
  byte is scored once with at least ``window - S`` bytes of context (all of it in the first window).

BPB = sum of cross-entropies (nats) / number of bytes / ln 2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from tqdm import tqdm

from mambabyte.errors import UserError

DEFAULT_SEPARATOR = b"\x00"
DEFAULT_WINDOW = 1024  # with the state carried it only bounds memory: a scan may hold (batch, window, d_inner, d_state)


@dataclass(frozen=True)
class PositionBucket:
    """Bytes at positions ``start <= p < end`` of their document (p = bytes of the document before them)."""

    start: int
    end: int
    num_bytes: int
    bits_per_byte: float


@dataclass(frozen=True)
class Evaluation:
    bits_per_byte: float
    num_bytes: int
    num_documents: int
    mode: str  # "state" or "sliding-window"
    window: int
    stride: int | None
    by_position: list[PositionBucket]


def separator_from_info(info: dict) -> bytes:
    """The document separator a checkpoint was trained with (metadata key "separator", latin-1), else NUL."""
    separator = info.get("separator")
    if separator is None:
        return DEFAULT_SEPARATOR
    try:
        separator = separator.encode("latin-1")
    except (AttributeError, UnicodeEncodeError):
        raise UserError(f"checkpoint metadata 'separator' must be a latin-1 string, got {separator!r}") from None
    if not separator:
        raise UserError("checkpoint metadata 'separator' is empty: a document needs at least one byte of context")
    return separator


def bucket_range(index: int) -> tuple[int, int]:
    """Positions of bucket ``index``: [0, 1), [1, 2), [2, 4), [4, 8), ... (powers of two)."""
    return (0, 1) if index == 0 else (1 << (index - 1), 1 << index)


class LossTally:
    """Cross-entropy sums (nats) over scored bytes, in total and by power-of-two position bucket."""

    def __init__(self) -> None:
        self.num_bytes = 0
        self.nats = 0.0
        self.bucket_bytes: list[int] = []
        self.bucket_nats: list[float] = []

    def add(self, losses: Tensor) -> None:
        """losses (length,): nats of the bytes at positions 0 .. length-1 of one document."""
        cumulative = torch.cat([losses.new_zeros(1, dtype=torch.float64), losses.double().cumsum(0)])
        length = losses.numel()
        self.num_bytes += length
        self.nats += cumulative[-1].item()
        index = 0
        while bucket_range(index)[0] < length:
            start, end = bucket_range(index)
            end = min(end, length)
            if index == len(self.bucket_bytes):
                self.bucket_bytes.append(0)
                self.bucket_nats.append(0.0)
            self.bucket_bytes[index] += end - start
            self.bucket_nats[index] += (cumulative[end] - cumulative[start]).item()
            index += 1

    @property
    def bits_per_byte(self) -> float:
        return self.nats / self.num_bytes / math.log(2)

    def by_position(self) -> list[PositionBucket]:
        return [PositionBucket(*bucket_range(i), count, nats / count / math.log(2))
                for i, (count, nats) in enumerate(zip(self.bucket_bytes, self.bucket_nats))]


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, as in training; full fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def _cross_entropy(model: nn.Module, inputs: Tensor, targets: Tensor, state=None, carry_state: bool = False):
    """inputs, targets (batch, length) -> (nats of each target (batch, length) fp32, state after the last input)."""
    with _autocast(inputs.device):
        if carry_state:
            logits, state = model(inputs, state=state, return_state=True)
        else:
            logits = model(inputs)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view_as(targets), state


def _ids(rows: Sequence[bytes | Sequence[int]], device: torch.device) -> Tensor:
    """Byte strings or token-id lists -> ids (len(rows), longest) on device, right-padded with 0
    (causal models ignore what follows)."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for row, data in enumerate(rows):
        ids[row, : len(data)] = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes)
                                 else torch.as_tensor(data, dtype=torch.long))
    return ids.to(device)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _scored_in(start: int, end: int, first: int, last: int) -> int:
    """How many of the positions [start, end) fall in [first, last)."""
    return max(0, min(end, last) - max(start, first))


def _state_carrying_losses(model, sequences, skip, window, batch_size, device, bar) -> Iterator[tuple[int, Tensor]]:
    # longest first, so the rows still running at a window are a prefix of the batch and the rest can be dropped
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for batch in _batches(order, batch_size):
        lengths = [len(sequences[i]) - 1 for i in batch]  # inputs per row, descending
        ids = _ids([sequences[i] for i in batch], device)
        losses = torch.zeros(len(batch), lengths[0], device=device)
        state = None
        for start in range(0, lengths[0], window):
            end = min(start + window, lengths[0])
            active = sum(length > start for length in lengths)
            if state is not None:
                state = tree_map(lambda t: t[:active], state)
            losses[:active, start:end], state = _cross_entropy(
                model, ids[:active, start:end], ids[:active, start + 1:end + 1], state, carry_state=True)
            bar.update(sum(_scored_in(start, end, skip, length) for length in lengths))
        for row, i in enumerate(batch):
            yield i, losses[row, skip:lengths[row]].cpu()


def _sliding_window_losses(model, sequences, skip, window, stride, batch_size, device, bar
                           ) -> Iterator[tuple[int, Tensor]]:
    def windows():
        """(document, first input, end of inputs, first scored input) of every window, documents in order."""
        for i, sequence in enumerate(sequences):
            length, scored_to = len(sequence) - 1, 0
            for begin in range(0, length, stride):
                end = min(begin + window, length)
                yield i, begin, end, scored_to
                scored_to = end
                if end == length:
                    break

    pending: dict[int, Tensor] = {}
    for batch in _batches(windows(), batch_size):
        ids = _ids([sequences[i][begin:end + 1] for i, begin, end, _ in batch], device)
        losses, _ = _cross_entropy(model, ids[:, :-1], ids[:, 1:])
        losses = losses.cpu()
        for row, (i, begin, end, scored_from) in enumerate(batch):
            length = len(sequences[i]) - 1
            document = pending.setdefault(i, torch.empty(length))
            document[scored_from:end] = losses[row, scored_from - begin:end - begin]
            bar.update(_scored_in(scored_from, end, skip, length))
            if end == length:
                yield i, pending.pop(i)[skip:]


def document_losses(model: nn.Module, documents: Sequence[bytes] | Sequence[list[int]], *,
                    separator: bytes | list[int] = DEFAULT_SEPARATOR,
                    window: int = DEFAULT_WINDOW, stride: int | None = None, batch_size: int = 8,
                    progress: bool = False) -> Iterator[tuple[int, Tensor]]:
    """Yields (index, nats of each byte of ``documents[index]`` (length,) fp32) for every non-empty document.

    The order of documents is not kept. ``stride=None`` carries the state across windows; an int
    selects the sliding-window evaluation (see the module docstring). Call under ``model.eval()``.
    ``documents`` and ``separator`` may also be token-id lists (a subword model): the same scoring, per token.
    """
    if not separator:
        raise UserError("the separator must be at least one byte: a document's first byte needs context")
    if window < 1:
        raise UserError(f"--window must be >= 1, got {window}")
    if stride is not None and not 1 <= stride <= window:
        raise UserError(f"--stride must be between 1 and the window ({window}), got {stride}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    kept = [i for i, document in enumerate(documents) if document]
    sequences = [separator + documents[i] for i in kept]
    skip = len(separator) - 1  # inputs whose target is still a separator byte
    total = sum(len(documents[i]) for i in kept)
    with tqdm(total=total, unit="B", unit_scale=True, desc="eval", disable=not progress, leave=False) as bar:
        if stride is None:
            losses = _state_carrying_losses(model, sequences, skip, window, batch_size, device, bar)
        else:
            losses = _sliding_window_losses(model, sequences, skip, window, stride, batch_size, device, bar)
        for position, nats in losses:
            yield kept[position], nats


def evaluate(model: nn.Module, documents: Sequence[bytes], *, separator: bytes = DEFAULT_SEPARATOR,
             window: int = DEFAULT_WINDOW, stride: int | None = None, batch_size: int = 8,
             progress: bool = False) -> Evaluation:
    """BPB of ``model`` over every byte of ``documents``, in total and by position within a document."""
    was_training = model.training
    model.eval()
    tally = LossTally()
    try:
        for _, losses in document_losses(model, documents, separator=separator, window=window, stride=stride,
                                         batch_size=batch_size, progress=progress):
            tally.add(losses)
    finally:
        model.train(was_training)
    if tally.num_bytes == 0:
        raise UserError("no bytes to evaluate: the data is empty")
    return Evaluation(bits_per_byte=tally.bits_per_byte, num_bytes=tally.num_bytes, num_documents=len(documents),
                      mode="state" if stride is None else "sliding-window", window=window, stride=stride,
                      by_position=tally.by_position())


def first_bytes(documents: Iterable[bytes], limit: int) -> list[bytes]:
    """The documents in order, up to ``limit`` bytes in all (the last one cut short): a quick, cheaper eval."""
    if limit < 1:
        raise UserError(f"--max-bytes must be >= 1, got {limit}")
    kept = []
    for document in documents:
        kept.append(document[:limit])
        limit -= len(kept[-1])
        if limit == 0:
            break
    return kept


def count_words(documents: Iterable[bytes]) -> int:
    """Whitespace-separated words (ASCII whitespace), the unit of the paper's word-level perplexity."""
    return sum(len(document.split()) for document in documents)


def word_perplexity(bits_per_byte: float, num_bytes: int, num_words: int) -> float | None:
    """The paper's word-level perplexity derived from BPB: 2 ** (BPB * bytes / words); None if it has no meaning."""
    if num_words == 0:
        return None
    try:
        return 2.0 ** (bits_per_byte * num_bytes / num_words)
    except OverflowError:
        return None


def plot_bits_per_byte_by_position(buckets: Sequence[PositionBucket], path: str | Path, *,
                                   train_length: int | None = None, references: dict[str, float] | None = None,
                                   title: str = "Bits per byte by position in the document") -> Path:
    """A PNG of BPB per position bucket (log-scaled positions); dashed lines for ``references`` (e.g. xz -9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    ends = [bucket.end for bucket in buckets]
    axes.plot(ends, [bucket.bits_per_byte for bucket in buckets], marker="o", label="model")
    for name, value in (references or {}).items():
        axes.axhline(value, linestyle="--", linewidth=1, color="gray")
        axes.annotate(name, (ends[0], value), textcoords="offset points", xytext=(2, 2), fontsize=8, color="gray")
    if train_length:
        axes.axvline(train_length, color="red", linestyle=":", label=f"training length ({train_length:,} bytes)")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("position in document (bucket end, bytes)")
    axes.set_ylabel("bits per byte")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

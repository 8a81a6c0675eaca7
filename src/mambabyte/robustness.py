"""Robustness to character-level noise: a byte model beside a subword model, both in bits per byte.

Both models read the same documents, clean and corrupted (``mambabyte.noise``), and are scored in one
unit: total cross-entropy (nats) over the text / number of bytes of that text / ln 2. The byte model is
scored by ``evaluate``; the subword model by the same document-loss code on its token ids, each
document starting after the separator's tokens (as ``subword.tokenize_corpus`` lays out training data),
its loss summed over tokens and divided by the document's bytes. Relative degradation of a model under a
corruption = (BPB on the corrupted text - BPB on the clean text) / BPB on the clean text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from mambabyte.errors import UserError
from mambabyte.evaluate import DEFAULT_SEPARATOR, DEFAULT_WINDOW, document_losses, evaluate
from mambabyte.noise import CORRUPTIONS, corrupt
from mambabyte.subword import SubwordTokenizer

# One rate per corruption, after ByT5's noise types (the MambaByte paper's exact rates are not confirmed here).
DEFAULT_P = {"drop": 0.1, "repeat": 0.2, "swap": 0.1, "uppercase": 1.0, "random_case": 1.0, "antspeak": 1.0}
CLEAN = "clean"


@dataclass(frozen=True)
class RobustnessRow:
    """Both models on one version of the text: clean (p = 0) or one corruption at rate p."""

    corruption: str  # "clean" or a key of noise.CORRUPTIONS
    p: float
    num_bytes: int  # bytes of this version of the text, the denominator of both BPBs
    num_tokens: int  # the subword model's tokens for the same text
    byte_bits_per_byte: float
    subword_bits_per_byte: float
    byte_degradation: float  # (BPB - clean BPB) / clean BPB; 0 on the clean row
    subword_degradation: float


def corrupt_documents(documents: Sequence[bytes], kind: str, p: float, seed: int = 0) -> list[bytes]:
    """Every document corrupted on its own, with a seed drawn from (seed, its index): reproducible, and
    no two documents share a noise pattern."""
    return [corrupt(document, kind, p, int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
            for index, document in enumerate(documents)]


def subword_bits_per_byte(model: nn.Module, tokenizer: SubwordTokenizer, documents: Sequence[bytes],
                          separator: bytes = DEFAULT_SEPARATOR, *, window: int = DEFAULT_WINDOW,
                          batch_size: int = 8, progress: bool = False) -> float:
    """Total NLL of a subword model over the tokens of ``documents`` / their number of BYTES / ln 2.

    Each document is tokenized on its own and read after the separator's tokens, from a fresh state.
    """
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the subword model has {model.config.vocab_size} token ids, "
                        f"its tokenizer {tokenizer.vocab_size}: they do not belong together")
    num_bytes = sum(map(len, documents))
    if num_bytes == 0:
        raise UserError("no bytes to evaluate: the data is empty")
    token_documents = [tokenizer.encode(document) for document in documents]
    was_training = model.training
    model.eval()
    nats = 0.0
    try:
        for _, losses in document_losses(model, token_documents, separator=tokenizer.encode(separator),
                                         window=window, batch_size=batch_size, progress=progress):
            nats += losses.double().sum().item()
    finally:
        model.train(was_training)
    return nats / num_bytes / math.log(2)


def check_corruptions(corruptions: Sequence[tuple[str, float]]) -> None:
    """Refuse an unknown kind or a p outside [0, 1] before any model runs."""
    for kind, p in corruptions:
        if kind not in CORRUPTIONS:
            raise UserError(f"unknown corruption {kind!r}; choose from: {', '.join(CORRUPTIONS)}")
        if not 0.0 <= p <= 1.0:
            raise UserError(f"p must be in [0, 1], got {p} for {kind}")


def corruption_grid(kinds: Sequence[str] | None = None, ps: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """(kind, p) pairs, checked: every kind (default all) at each of ``ps`` (default its DEFAULT_P rate)."""
    kinds = list(CORRUPTIONS) if kinds is None else list(kinds)
    if not kinds:
        raise UserError("no corruption given")
    check_corruptions([(kind, 0.0) for kind in kinds])  # the names first: only known kinds have a default rate
    grid = [(kind, p) for kind in kinds for p in (ps if ps is not None else [DEFAULT_P[kind]])]
    check_corruptions(grid)
    return grid


def robustness_table(byte_model: nn.Module, subword_model: nn.Module, tokenizer: SubwordTokenizer,
                     documents: Sequence[bytes], corruptions: Sequence[tuple[str, float]] | None = None, *,
                     seed: int = 0, byte_separator: bytes = DEFAULT_SEPARATOR,
                     subword_separator: bytes = DEFAULT_SEPARATOR, window: int = DEFAULT_WINDOW,
                     batch_size: int = 8, progress: bool = False) -> list[RobustnessRow]:
    """BPB of both models on the clean documents, then on each (kind, p) corruption of them (default: every
    kind at its DEFAULT_P rate); the first row is the clean text."""
    corruptions = corruption_grid() if corruptions is None else list(corruptions)
    check_corruptions(corruptions)
    measured = []
    for kind, p in [(CLEAN, 0.0), *corruptions]:
        texts = list(documents) if kind == CLEAN else corrupt_documents(documents, kind, p, seed)
        byte_bpb = evaluate(byte_model, texts, separator=byte_separator, window=window, batch_size=batch_size,
                            progress=progress).bits_per_byte
        subword_bpb = subword_bits_per_byte(subword_model, tokenizer, texts, subword_separator, window=window,
                                            batch_size=batch_size, progress=progress)
        num_tokens = sum(len(tokenizer.encode(text)) for text in texts)
        measured.append((kind, p, sum(map(len, texts)), num_tokens, byte_bpb, subword_bpb))
    clean_byte, clean_subword = measured[0][4:]
    return [RobustnessRow(kind, p, num_bytes, num_tokens, byte_bpb, subword_bpb,
                          byte_degradation=(byte_bpb - clean_byte) / clean_byte,
                          subword_degradation=(subword_bpb - clean_subword) / clean_subword)
            for kind, p, num_bytes, num_tokens, byte_bpb, subword_bpb in measured]


def _label(row: RobustnessRow) -> str:
    return CLEAN if row.corruption == CLEAN else f"{row.corruption} p={row.p:g}"


def format_markdown(rows: Sequence[RobustnessRow]) -> str:
    """The table as GitHub markdown: BPB of both models and their relative degradation from clean."""
    lines = ["| text | p | bytes | bytes/token | byte model BPB | degradation | subword model BPB | degradation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        clean = row.corruption == CLEAN
        p = "-" if clean else f"{row.p:g}"
        byte_change = "-" if clean else f"{row.byte_degradation:+.1%}"
        subword_change = "-" if clean else f"{row.subword_degradation:+.1%}"
        lines.append(f"| {row.corruption} | {p} | {row.num_bytes:,} | {row.num_bytes / max(1, row.num_tokens):.2f} "
                     f"| {row.byte_bits_per_byte:.4f} | {byte_change} "
                     f"| {row.subword_bits_per_byte:.4f} | {subword_change} |")
    return "\n".join(lines) + "\n"


def plot_robustness(rows: Sequence[RobustnessRow], path: str | Path, *,
                    title: str = "Byte vs subword model under character noise") -> Path:
    """A PNG with two grouped bar charts: BPB per text version, and relative degradation from clean (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(row) for row in rows]
    positions = np.arange(len(rows))
    width = 0.38
    figure, (bpb_axes, change_axes) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows)), 4.5))
    for offset, name, bpb, change in (
            (-width / 2, "byte model", [r.byte_bits_per_byte for r in rows], [r.byte_degradation for r in rows]),
            (width / 2, "subword model", [r.subword_bits_per_byte for r in rows],
             [r.subword_degradation for r in rows])):
        bpb_axes.bar(positions + offset, bpb, width, label=name)
        change_axes.bar(positions[1:] + offset, [100 * c for c in change[1:]], width, label=name)
    bpb_axes.set_ylabel("bits per byte")
    change_axes.set_ylabel("relative degradation from clean (%)")
    change_axes.axhline(0, color="black", linewidth=0.8)
    bpb_axes.set_xticks(positions, labels, rotation=30, ha="right")
    change_axes.set_xticks(positions[1:], labels[1:], rotation=30, ha="right")
    for axes in (bpb_axes, change_axes):
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

"""A byte-level BPE tokenizer trained locally with the `tokenizers` library (nothing is downloaded).

It gives the subword drafter of speculative decoding and the subword baseline of the robustness
study their vocabulary. Every token maps to an exact byte string (``token_bytes``), so subword
predictions can be checked byte by byte and a subword model's loss can be counted per byte.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

from mambabyte.data import ByteCorpus
from mambabyte.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-to-printable-character map used by byte-level BPE, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the subword tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    return tokenizers


class SubwordTokenizer:
    """Byte-level BPE: text <-> token ids, and the exact bytes of every token."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int) -> "SubwordTokenizer":
        """Learns a BPE vocabulary of ``vocab_size`` tokens (at least the 256 byte tokens) from documents."""
        tk = _require_tokenizers()
        if vocab_size < 257:
            raise UserError(f"--vocab-size must be > 256 (the byte alphabet), got {vocab_size}")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        texts = (doc.decode("utf-8", errors="replace") for doc in documents)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubwordTokenizer":
        """From a tokenizer directory (holding tokenizer.json) or the file itself."""
        tk = _require_tokenizers()
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer at {path} (expected {TOKENIZER_FILE})")
        try:
            return cls(tk.Tokenizer.from_file(str(file)))
        except Exception as error:  # the library raises a bare Exception for a malformed file
            raise UserError(f"tokenizer {file} is unreadable: {error}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(directory / TOKENIZER_FILE))
        return directory

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """token id -> the exact bytes it stands for."""
        alphabet = _byte_level_alphabet()
        return [bytes(alphabet[c] for c in self._tokenizer.id_to_token(i)) for i in range(self.vocab_size)]

    @cached_property
    def _byte_token(self) -> dict[str, int]:
        """A byte outside valid UTF-8 (as a surrogate escape) -> the id of its single-byte token."""
        chars = {b: c for c, b in _byte_level_alphabet().items()}
        return {chr(0xDC00 + b): self._tokenizer.token_to_id(chars[b]) for b in range(128, 256)}

    def encode(self, data: bytes | str) -> list[int]:
        """Token ids whose bytes are exactly ``data``; bytes that are not UTF-8 become single-byte tokens."""
        text = data if isinstance(data, str) else data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        for piece in re.split(r"([\udc80-\udcff])", text):
            if piece in self._byte_token:
                ids.append(self._byte_token[piece])
            elif piece:
                ids.extend(self._tokenizer.encode(piece).ids)
        return ids

    def decode(self, ids: Iterable[int]) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)


def tokenize_corpus(corpus: ByteCorpus, tokenizer: SubwordTokenizer, separator: bytes) -> ByteCorpus:
    """The corpus as token ids (int32), each document prefixed with the separator's tokens.

    Sample it with ``WindowSampler(..., separator=b"")``: the separator is already part of every document.
    """
    prefix = tokenizer.encode(separator)
    documents = [np.asarray(prefix + tokenizer.encode(doc), dtype=np.int32) for doc in corpus.documents()]
    ends = np.cumsum([len(doc) for doc in documents])
    data = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int32)
    return ByteCorpus(data, ends - np.array([len(doc) for doc in documents]), ends, f"{corpus.name} (tokens)")

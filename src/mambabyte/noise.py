"""Character-level corruptions for robustness studies (following ByT5's noise types, as MambaByte does).

Every corruption works on Unicode characters, never on the bytes inside one, so valid UTF-8 stays
valid; bytes that are not UTF-8 pass through as single units (``surrogateescape``). Each is applied
with probability ``p`` and is reproducible from ``seed``.
"""

from __future__ import annotations

import re

import numpy as np

from mambabyte.errors import UserError

MAX_EXTRA_REPEATS = 3


def _drop(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each character is removed with probability p."""
    keep = rng.random(len(chars)) >= p
    return [c for c, k in zip(chars, keep) if k]


def _repeat(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each character, with probability p, is followed by 1 to 3 copies of itself."""
    chosen = rng.random(len(chars)) < p
    extra = rng.integers(1, MAX_EXTRA_REPEATS + 1, size=len(chars))
    return [c * (1 + int(n)) if hit else c for c, hit, n in zip(chars, chosen, extra)]


def _swap(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each character, with probability p, trades places with its right neighbour (pairs never overlap)."""
    out = list(chars)
    draws = rng.random(len(chars))
    i = 0
    while i < len(out) - 1:
        if draws[i] < p:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return out


def _uppercase(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each character is upper-cased with probability p (p=1: the whole text)."""
    chosen = rng.random(len(chars)) < p
    return [c.upper() if hit else c for c, hit in zip(chars, chosen)]


def _random_case(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each character, with probability p, gets a random case (upper or lower, equally likely)."""
    chosen = rng.random(len(chars)) < p
    upper = rng.random(len(chars)) < 0.5
    return [(c.upper() if up else c.lower()) if hit else c for c, hit, up in zip(chars, chosen, upper)]


def _antspeak(chars: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """Each word, with probability p, is upper-cased with a space between its characters ("ant speak")."""
    text = "".join(chars)
    pieces = re.split(r"(\s+)", text)
    words = [i for i, piece in enumerate(pieces) if piece and not piece.isspace()]
    chosen = rng.random(len(words)) < p
    for i, hit in zip(words, chosen):
        if hit:
            pieces[i] = " ".join(pieces[i].upper())
    return list("".join(pieces))


CORRUPTIONS = {
    "drop": _drop,
    "repeat": _repeat,
    "swap": _swap,
    "uppercase": _uppercase,
    "random_case": _random_case,
    "antspeak": _antspeak,
}


def corrupt(data: bytes | str, kind: str, p: float, seed: int = 0) -> bytes:
    """The corrupted text as bytes. ``kind`` is one of CORRUPTIONS; p in [0, 1]."""
    if kind not in CORRUPTIONS:
        raise UserError(f"unknown corruption {kind!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if not 0.0 <= p <= 1.0:
        raise UserError(f"p must be in [0, 1], got {p}")
    text = data if isinstance(data, str) else data.decode("utf-8", errors="surrogateescape")
    chars = CORRUPTIONS[kind](list(text), p, np.random.default_rng(seed))
    return "".join(chars).encode("utf-8", errors="surrogateescape")

"""Which bytes may come next in valid UTF-8: a small automaton over bytes, as tables for masking logits.

The automaton (RFC 3629, the same ranges a strict decoder accepts) has one state per "what the next
byte must be": ``READY`` (a character may start: ASCII or a lead byte C2-F4), or partway through a
multi-byte character, where the next byte is a continuation byte, sometimes of a narrower range
(after E0: A0-BF, no overlong forms; after ED: 80-9F, no surrogates; after F0: 90-BF; after F4: 80-8F,
nothing past U+10FFFF). A sequence of bytes decodes strictly iff every byte is allowed in the state
before it and the sequence ends in ``READY``.
"""

from __future__ import annotations

import torch
from torch import Tensor

READY = 0
# (state, lowest allowed byte, highest allowed byte, state after it); states 1-7 wait for continuation bytes
_CONTINUATIONS = [
    (1, 0x80, 0xBF, READY),  # one continuation byte left
    (2, 0x80, 0xBF, 1),  # two left
    (3, 0xA0, 0xBF, 1),  # after E0
    (4, 0x80, 0x9F, 1),  # after ED
    (5, 0x80, 0xBF, 2),  # three left (after F1-F3)
    (6, 0x90, 0xBF, 2),  # after F0
    (7, 0x80, 0x8F, 2),  # after F4
]
_LEADS = [  # (lowest byte, highest byte, state after it) from READY
    (0x00, 0x7F, READY),
    (0xC2, 0xDF, 1),
    (0xE0, 0xE0, 3),
    (0xE1, 0xEC, 2),
    (0xED, 0xED, 4),
    (0xEE, 0xEF, 2),
    (0xF0, 0xF0, 6),
    (0xF1, 0xF3, 5),
    (0xF4, 0xF4, 7),
]
NUM_STATES = 8
BYTES_LEFT = (0, 1, 2, 2, 2, 3, 3, 3)  # continuation bytes still to come in each state
INVALID = -1


def _transitions() -> list[list[int]]:
    table = [[INVALID] * 256 for _ in range(NUM_STATES)]
    for low, high, after in _LEADS:
        for byte in range(low, high + 1):
            table[READY][byte] = after
    for state, low, high, after in _CONTINUATIONS:
        for byte in range(low, high + 1):
            table[state][byte] = after
    return table


TRANSITIONS = _transitions()  # TRANSITIONS[state][byte]: the next state, or INVALID


def advance(state: int, data: bytes) -> int:
    """The automaton's state after ``data``; an invalid byte abandons the character, as a decoder resyncs."""
    for byte in data:
        following = TRANSITIONS[state][byte]
        if following == INVALID and state != READY:
            following = TRANSITIONS[READY][byte]  # the byte that broke a character may start the next one
        state = READY if following == INVALID else following
    return state


def mask_tables(device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(allowed (states, 256) bool, next state (states, 256) long, bytes left after it (states, 256) long)."""
    table = torch.tensor(TRANSITIONS, dtype=torch.long, device=device)
    allowed = table != INVALID
    following = table.clamp(min=0)
    left = torch.tensor(BYTES_LEFT, dtype=torch.long, device=device)[following]
    return allowed, following, left

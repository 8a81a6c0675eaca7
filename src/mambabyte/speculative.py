"""Speculative decoding across vocabularies: a subword model drafts, the byte model verifies.

One round:
1. the drafter proposes ``draft_len`` subword tokens greedily from its state, i.e. a string of bytes d;
2. the byte model reads d in one parallel forward from its current state, giving its prediction for
   every position of d and one past it;
3. the longest prefix the byte model agrees with is kept, and the byte model supplies the next byte
   (its correction where they part, or a bonus byte when all of d was accepted);
4. both models resynchronise: the byte model re-reads the kept bytes from the saved state (or steps the
   bonus byte), the drafter rolls back to its state after the last whole token it got right and reads
   the re-tokenised tail.

Greedy decoding gives exactly the byte model's greedy output. With sampling, a drafted byte x is kept
with probability p(x) (the byte model's probability, after temperature/top-k/top-p), and on rejection
the byte is drawn from p with x removed and renormalised: since the draft does not depend on the
verifier's coins, this is speculative sampling with a point-mass proposal and the output follows p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mambabyte.subword import SubwordTokenizer


@dataclass
class SpeculativeStats:
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


def _ids(data: bytes | list[int], device) -> Tensor:
    return torch.tensor([list(data)], dtype=torch.long, device=device)


class SpeculativeDecoder:
    """Generates with ``byte_model`` (vocab 256) while ``drafter`` (vocab of ``tokenizer``) proposes.

    ``probs``: maps byte logits (256,) to the sampling distribution; None means greedy decoding.
    """

    def __init__(self, byte_model, drafter, tokenizer: SubwordTokenizer, draft_len: int = 4,
                 probs: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None):
        self.byte_model = byte_model
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.draft_len = draft_len
        self.probs = probs
        self.generator = generator
        self.stats = SpeculativeStats()

    def _choose(self, logits: Tensor) -> int:
        if self.probs is None:
            return int(logits.argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def _accepts(self, logits: Tensor, byte: int) -> tuple[bool, int | None]:
        """Whether the verifier keeps a drafted byte; if not, the byte it puts there instead."""
        if self.probs is None:
            best = int(logits.argmax())
            return best == byte, best
        p = self.probs(logits)
        if torch.rand((), generator=self.generator, device=p.device) < p[byte]:
            return True, None
        residual = p.clone()
        residual[byte] = 0
        return False, int(torch.multinomial(residual / residual.sum(), 1, generator=self.generator))

    def _draft(self, state, logits: Tensor):
        """Greedy subword tokens from the drafter, and its state before each one and after the last."""
        tokens, states = [], [state]
        for _ in range(self.draft_len):
            token = int(logits.argmax())
            logits, state = self.drafter.step(torch.tensor([token], device=logits.device), state)
            logits = logits[0]
            tokens.append(token)
            states.append(state)
        return tokens, states

    def _drafter_read(self, data: bytes, state):
        ids = self.tokenizer.encode(data)
        device = next(self.drafter.parameters()).device
        logits, state = self.drafter(_ids(ids, device), state=state, return_state=True)
        return logits[0, -1], state

    @torch.no_grad()
    def generate(self, context: bytes, max_bytes: int) -> bytes:
        """Continues ``context`` (the document-start separator plus the prompt) by up to max_bytes bytes."""
        device = next(self.byte_model.parameters()).device
        logits, byte_state = self.byte_model(_ids(context, device), state=self.byte_model.init_state(1), return_state=True)
        byte_logits = logits[0, -1]
        draft_logits, draft_state = self._drafter_read(context, self.drafter.init_state(1))
        self.stats.byte_model_calls += 1
        out = bytearray()
        while len(out) < max_bytes:
            tokens, draft_states = self._draft(draft_state, draft_logits)
            piece = self.tokenizer.decode(tokens)
            verify, verified_state = self.byte_model(_ids(piece, device), state=byte_state, return_state=True)
            self.stats.byte_model_calls += 1
            predictions = torch.cat([byte_logits[None], verify[0]], dim=0)  # the verifier's view before each byte
            kept, next_byte = 0, None
            while kept < len(piece):
                ok, replacement = self._accepts(predictions[kept], piece[kept])
                if not ok:
                    next_byte = replacement
                    break
                kept += 1
            self.stats.rounds += 1
            self.stats.drafted_bytes += len(piece)
            self.stats.accepted_bytes += kept
            if next_byte is None:  # everything accepted: the verifier adds a bonus byte
                next_byte = self._choose(predictions[-1])
                step_logits, byte_state = self.byte_model.step(torch.tensor([next_byte], device=device), verified_state)
                byte_logits = step_logits[0]
            else:
                logits, byte_state = self.byte_model(_ids(piece[:kept] + bytes([next_byte]), device),
                                                     state=byte_state, return_state=True)
                byte_logits = logits[0, -1]
            self.stats.byte_model_calls += 1
            new = piece[:kept] + bytes([next_byte])
            out += new
            # the drafter keeps the whole tokens it got right and re-reads the rest
            whole, length = 0, 0
            while whole < len(tokens) and length + len(self.tokenizer.token_bytes[tokens[whole]]) <= kept:
                length += len(self.tokenizer.token_bytes[tokens[whole]])
                whole += 1
            draft_logits, draft_state = self._drafter_read(new[length:], draft_states[whole])
        self.stats.generated_bytes += min(len(out), max_bytes)
        return bytes(out[:max_bytes])

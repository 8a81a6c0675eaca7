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

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mambabyte.checkpoint import load_pretrained
from mambabyte.errors import UserError
from mambabyte.evaluate import DEFAULT_SEPARATOR
from mambabyte.generate import Sampling, StopFilter, check_stops
from mambabyte.subword import TOKENIZER_FILE, SubwordTokenizer


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
        self._healing: dict[bytes, Tensor] = {}

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

    def _continuations(self, pending: bytes) -> Tensor:
        """Ids of the tokens whose bytes start with ``pending`` (token healing), cached."""
        if pending not in self._healing:
            ids = [i for i, token in enumerate(self.tokenizer.token_bytes) if token.startswith(pending)]
            self._healing[pending] = torch.tensor(ids, device=next(self.drafter.parameters()).device)
        return self._healing[pending]

    def _draft(self, state, logits: Tensor, pending: bytes):
        """Greedy subword tokens from the drafter, its state and logits before each one, and the new bytes.

        The first token must start with ``pending`` (bytes already written but not yet read by the drafter),
        so the drafter never has to continue from inside a token.
        """
        tokens, states, all_logits = [], [state], [logits]
        while len(tokens) < self.draft_len or len(self.tokenizer.decode(tokens)) <= len(pending):
            if tokens:
                token = int(logits.argmax())
            else:
                allowed = self._continuations(pending)
                token = int(allowed[logits[allowed].argmax()])
            logits, state = self.drafter.step(torch.tensor([token], device=logits.device), state)
            logits = logits[0]
            tokens.append(token)
            states.append(state)
            all_logits.append(logits)
        return tokens, states, all_logits, self.tokenizer.decode(tokens)[len(pending):]

    def _drafter_read(self, data: bytes, state, logits: Tensor | None):
        """Reads all of ``data`` but its last token, which stays pending: (logits, state, pending bytes)."""
        ids = self.tokenizer.encode(data)
        read, pending = (ids[:-1], self.tokenizer.token_bytes[ids[-1]]) if logits is not None or len(ids) > 1 else (ids, b"")
        if read:
            device = next(self.drafter.parameters()).device
            all_logits, state = self.drafter(_ids(read, device), state=state, return_state=True)
            logits = all_logits[0, -1]
        return logits, state, pending

    @torch.no_grad()
    def stream(self, context: bytes, max_bytes: int) -> Iterator[bytes]:
        """Continues ``context`` (the document-start separator plus the prompt); yields each round's bytes."""
        device = next(self.byte_model.parameters()).device
        logits, byte_state = self.byte_model(_ids(context, device), state=self.byte_model.init_state(1), return_state=True)
        byte_logits = logits[0, -1]
        draft_logits, draft_state, pending = self._drafter_read(context, self.drafter.init_state(1), None)
        self.stats.byte_model_calls += 1
        produced = 0
        while produced < max_bytes:
            tokens, draft_states, draft_all_logits, piece = self._draft(draft_state, draft_logits, pending)
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
            new = (piece[:kept] + bytes([next_byte]))[: max_bytes - produced]
            produced += len(new)
            self.stats.generated_bytes += len(new)
            yield new
            if produced < max_bytes:  # the drafter keeps the whole tokens it got right and re-reads the rest
                text, written = pending + piece, len(pending) + kept
                whole, length = 0, 0
                while whole < len(tokens) and length + len(self.tokenizer.token_bytes[tokens[whole]]) <= written:
                    length += len(self.tokenizer.token_bytes[tokens[whole]])
                    whole += 1
                draft_logits, draft_state, pending = self._drafter_read(
                    text[length:written] + bytes([next_byte]), draft_states[whole], draft_all_logits[whole])

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
                       stats: SpeculativeStats | None = None, **sampling) -> Iterator[bytes]:
    """Like ``generate.stream``, but drafted by ``drafter``; the same output as plain decoding when greedy.

    ``sampling``: temperature, top_k, top_p, min_p (repetition penalty and strict UTF-8 are not supported).
    ``stats``: filled in as decoding goes (acceptance rate, bytes per byte-model call).
    """
    if draft_len < 1:
        raise UserError(f"--draft-len must be >= 1, got {draft_len}")
    rules = Sampling(**sampling)
    if rules.repetition_penalty != 1 or rules.utf8 != "any":
        raise UserError("speculative decoding supports temperature, top-k, top-p and min-p only")
    if max_bytes < 0:
        raise UserError(f"--max-bytes must be >= 0, got {max_bytes}")
    generator = torch.Generator(device=next(byte_model.parameters()).device).manual_seed(seed)
    probs = None if rules.greedy else (lambda logits: rules.probs(logits[None])[0])
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, probs, generator)
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

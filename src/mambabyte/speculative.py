"""Speculative decoding across vocabularies: a subword model drafts, the byte model verifies.

The byte model has read everything written except the last byte, ``carry``. One round:
1. the drafter proposes ``draft_len`` subword tokens greedily from its state: new bytes d;
2. the byte model reads ``carry`` + d in ONE call (``forward_states``) from its state, giving its prediction
   for every byte of d and one past it, and its state after every position;
3. the longest prefix of d it agrees with is kept and it supplies the byte after it (its correction where
   they part, or a bonus byte when all of d was kept): the next ``carry``, read at the next round;
4. the byte model rolls back to its state after the kept prefix (``state_at``, nothing re-read); the
   drafter rolls back to its state after the last whole token it got right and reads the re-tokenised tail.
The context is read first as plain decoding reads a prompt (``generate.read_bytes``), and its last logits
judge the first draft (no carry yet): greedy output then matches plain decoding bit for bit in bf16 too,
where a step and a prompt read round differently.

A round costs one byte-model call (at most) and one transfer from the device for the verdict, and yields
the kept bytes plus one. Greedy decoding gives exactly the byte model's greedy output. With sampling, a drafted
byte x is kept with probability p(x) (the byte model's probability, after temperature/top-k/top-p/min-p),
and on rejection the byte is drawn from p with x removed and renormalised: since the draft does not depend
on the verifier's coins, this is speculative sampling with a point-mass proposal and the output follows p.

On CUDA both models run from fixed buffers and replay CUDA graphs (speculative_models.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mambabyte.checkpoint import load_pretrained
from mambabyte.cuda_graphs import GraphCapture
from mambabyte.errors import UserError
from mambabyte.evaluate import DEFAULT_SEPARATOR
from mambabyte.generate import Sampling, StopFilter, check_stops
from mambabyte.speculative_models import ByteVerifier, DraftDecoder, GraphByteVerifier, GraphDraftDecoder, on_device
from mambabyte.subword import TOKENIZER_FILE, SubwordTokenizer


@dataclass
class SpeculativeStats:
    """What decoding did. ``byte_model_calls``: calls while decoding (one per round, none in a first round that
    drafted nothing), the prompt's read not counted."""

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


class SpeculativeDecoder:
    """Generates with ``byte_model`` (vocab 256) while ``drafter`` (vocab of ``tokenizer``) proposes.

    ``probs``: maps byte logits (rows, 256) to the sampling distributions (rows, 256); None means greedy.
    The byte model must keep its state after every position of a span (``forward_states``, ``state_at``).
    ``cuda_graph``: on CUDA, replay CUDA graphs (same output; see the module's docstring).
    ``dtype``: the byte model's compute precision, as ``Decoder``'s (None: bf16 autocast on CUDA, fp32 elsewhere).
    """

    def __init__(self, byte_model, drafter, tokenizer: SubwordTokenizer, draft_len: int = 4,
                 probs: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
                 cuda_graph: bool = True, dtype: torch.dtype | None = None):
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
        self.verifier = (GraphByteVerifier(byte_model, capture, dtype) if cuda_graph and self.device.type == "cuda"
                         else ByteVerifier(byte_model, dtype))

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
        drafted = on_device(list(piece), p.device)
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
        # the context is read as plain decoding reads a prompt; its last logits judge the first round's draft
        first_logits = self.verifier.start(context)
        carry = b""  # written, not yet read by the byte model: nothing in the first round
        pending = self._drafter_start(context)
        produced = 0
        while produced < max_bytes:
            tokens, piece = self._draft(pending)
            piece = piece[: max_bytes - produced - 1]  # the round adds one byte of its own
            span = carry + piece
            if carry:
                logits = self.verifier.read(span)
            else:  # the first round: the context's last logits judge the first drafted byte
                logits = torch.cat([first_logits[None], self.verifier.read(span)]) if span else first_logits[None]
            kept, correction = self._verify(logits, piece)
            if len(carry) + kept:
                self.verifier.rollback(len(carry) + kept - 1)  # after the old carry and the kept bytes
            carry = bytes([correction])
            new = piece[:kept] + carry
            produced += len(new)
            self.stats.rounds += 1
            self.stats.byte_model_calls += bool(span)
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
                       stats: SpeculativeStats | None = None, cuda_graph: bool = True,
                       dtype: torch.dtype | None = None, **sampling
                       ) -> Iterator[bytes]:
    """Like ``generate.stream``, but drafted by ``drafter``; the same output as plain decoding when greedy.

    ``sampling``: temperature, top_k, top_p, min_p (repetition penalty and strict UTF-8 are not supported).
    ``stats``: filled in as decoding goes (acceptance rate, bytes per byte-model call).
    ``cuda_graph``: on CUDA, replay both models' calls as CUDA graphs (the same output, faster).
    ``dtype``: the byte model's compute precision, as ``generate``'s.
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
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, probs, generator, cuda_graph, dtype)
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

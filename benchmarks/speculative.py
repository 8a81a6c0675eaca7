"""Speculative decoding vs plain byte decoding, on held-out prompts.

    python benchmarks/speculative.py BYTE_CKPT DRAFT_CKPT [--data DIR] [--prompts 8] [--max-bytes 256]

Prints one row per decoding mode (greedy, sampled) and draft length: plain bytes/s (the Decoder that
``generate`` uses: one CUDA graph per byte on GPU), speculative bytes/s (CUDA graphs for the drafter's draft
and the byte model's spans on GPU), the speed-up, the acceptance rate, bytes per byte-model call, the subword
drafter's own greedy decoding speed in bytes/s (its draft, ``draft_len`` tokens per call, graph-replayed on
GPU), and whether the greedy outputs are identical to plain decoding. Each decoder is built once; the
speculative one goes twice over the prompts, the first pass capturing CUDA graphs (one per span length for the
byte model; its rate is shown too), the second timed; ``generate`` builds a Decoder, and captures, per call.
``--phases`` then times each model call of a greedy round (where a round's time goes).
"""

from __future__ import annotations

import argparse
import time

import torch

from mambabyte.checkpoint import load_pretrained, read_checkpoint_info
from mambabyte.data import load_corpus, shipped_corpus
from mambabyte.evaluate import separator_from_info
from mambabyte.generate import OUTPUT_BLOCK, Decoder, Sampling, stream_rows
from mambabyte.speculative import SpeculativeDecoder, SpeculativeStats, load_drafter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def plain_decoding(byte_model, prompts: list[bytes], max_bytes: int, temperature: float, separator: bytes,
                   dtype: torch.dtype, device: torch.device) -> tuple[list[bytes], float]:
    """(outputs, seconds) of plain decoding with one Decoder over the prompts, its graph captured untimed."""
    decoder = Decoder(byte_model, Sampling(temperature=temperature), [0], dtype=dtype)

    def run(prompt: bytes, max_bytes: int = max_bytes) -> bytes:
        decoder.start([prompt], separator)
        return b"".join(chunk for _, chunk in stream_rows(decoder, max_bytes, block=OUTPUT_BLOCK))

    run(prompts[0], 16)
    return _timed(lambda: [run(prompt) for prompt in prompts], device)


def speculative_decoding(decoder: SpeculativeDecoder, contexts: list[bytes], max_bytes: int, device: torch.device
                         ) -> tuple[list[bytes], float, float]:
    """(outputs, seconds) of the second pass over the prompts, and the first pass's seconds (graph captures
    included); ``decoder.stats`` counts the second pass only."""

    def run() -> list[bytes]:
        outputs = []
        for seed, context in enumerate(contexts):
            if decoder.generator is not None:
                decoder.generator.manual_seed(seed)
            outputs.append(decoder.generate(context, max_bytes))
        return outputs

    first_seconds = _timed(run, device)[1]  # captures the graphs of the span lengths these prompts meet
    decoder.stats = SpeculativeStats()
    return *_timed(run, device), first_seconds


@torch.no_grad()
def drafter_alone(decoder: SpeculativeDecoder, contexts: list[bytes], tokens: int, device: torch.device) -> float:
    """Bytes/s of the drafter decoding greedily by itself: about ``tokens`` tokens after each context, drafted
    ``draft_len`` at a time by the decoder's draft decoder (one graph replay and one transfer each on GPU)."""
    draft, tokenizer = decoder.draft_decoder, decoder.tokenizer
    any_token = torch.ones(tokenizer.vocab_size, dtype=torch.bool, device=decoder.drafter_device)
    draft.start(tokenizer.encode(contexts[0]))
    draft.draft(any_token)  # warm-up (graph capture)
    produced, seconds = 0, 0.0
    for context in contexts:
        draft.start(tokenizer.encode(context))
        drafts = max(1, tokens // draft.draft_len)
        ids, elapsed = _timed(lambda: [token for _ in range(drafts) for token in draft.draft(any_token)], device)
        produced += len(tokenizer.decode(ids))
        seconds += elapsed
    return produced / seconds


PHASES = (  # (row, the decoder's part, its method): every model call a round makes, and the context's reads
    ("read the context (byte model, once a prompt)", "verifier", "start"),
    ("read the context (drafter, once a prompt)", "draft_decoder", "start"),
    ("draft (drafter)", "draft_decoder", "draft"),
    ("re-read the boundary (drafter)", "draft_decoder", "read"),
    ("roll back (drafter)", "draft_decoder", "rollback"),
    ("verify (byte model)", "verifier", "read"),
    ("verdict (to the host)", None, "_verify"),
    ("roll back (byte model)", "verifier", "rollback"),
)


def round_phases(decoder: SpeculativeDecoder, contexts: list[bytes], max_bytes: int, device: torch.device
                 ) -> dict[str, float]:
    """Milliseconds per round in each model call of a round (the device synchronised around each, so these
    rounds run a little slower than unobserved ones), the rest of the round (host work in speculative.py:
    drafting bookkeeping, re-tokenising) and the whole round."""
    seconds = dict.fromkeys([name for name, _, _ in PHASES], 0.0)

    def observed(name, method):
        def call(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            result = method(*args, **kwargs)
            _sync(device)
            seconds[name] += time.perf_counter() - start
            return result
        return call

    parts = [(name, decoder if owner is None else getattr(decoder, owner), method) for name, owner, method in PHASES]
    decoder.stats = SpeculativeStats()
    try:
        for name, part, method in parts:  # instance attributes over the methods, removed afterwards
            setattr(part, method, observed(name, getattr(part, method)))
        _, total = _timed(lambda: [decoder.generate(context, max_bytes) for context in contexts], device)
    finally:
        for _, part, method in parts:
            if method in vars(part):
                delattr(part, method)
    rounds = max(1, decoder.stats.rounds)
    per_round = {name: 1e3 * value / rounds for name, value in seconds.items()}
    per_round["rest of the round (host)"] = 1e3 * total / rounds - sum(per_round.values())
    per_round["whole round"] = 1e3 * total / rounds
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("byte_checkpoint")
    parser.add_argument("draft_checkpoint")
    parser.add_argument("--data", default=str(shipped_corpus("valid")), help="held-out documents for the prompts")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=256)
    parser.add_argument("--max-bytes", type=int, default=256)
    parser.add_argument("--draft-len", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--temperature", type=float, default=0.7, help="for the sampled rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights and compute of both models (default: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--phases", action="store_true",
                        help="also time each model call of a round (greedy, the first draft length)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    byte_model = load_pretrained(args.byte_checkpoint, device=device)
    drafter, tokenizer = load_drafter(args.draft_checkpoint, device=device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    byte_model, drafter = byte_model.to(dtype), drafter.to(dtype)
    separator = separator_from_info(read_checkpoint_info(args.byte_checkpoint))
    corpus = load_corpus(args.data)
    prompts = [corpus.document(i)[: args.prompt_bytes] for i in range(min(args.prompts, corpus.num_documents))]
    print(f"byte model {byte_model.num_parameters() / 1e6:.1f}M params, drafter {drafter.num_parameters() / 1e6:.1f}M "
          f"params (vocab {tokenizer.vocab_size}), {device} {str(dtype)[6:]}, {torch.get_num_threads()} CPU threads, "
          f"{len(prompts)} prompts of {args.prompt_bytes} bytes, {args.max_bytes} bytes each\n")

    contexts = [separator + prompt for prompt in prompts]
    print("| decoding | draft len | plain bytes/s | speculative bytes/s | speed-up | first pass bytes/s (captures) "
          "| acceptance | bytes per byte-model call | drafter alone bytes/s | greedy identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    drafter_rates: dict[int, float] = {}
    for temperature in (0.0, args.temperature):
        plain, seconds = plain_decoding(byte_model, prompts, args.max_bytes, temperature, separator, dtype, device)
        plain_rate = sum(map(len, plain)) / seconds
        mode = "greedy" if temperature == 0 else f"sampled T={temperature}"
        for draft_len in args.draft_len:
            probs = None if temperature == 0 else Sampling(temperature=temperature).probs
            decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, probs,
                                         torch.Generator(device=device), dtype=dtype)
            if draft_len not in drafter_rates:
                drafter_rates[draft_len] = drafter_alone(decoder, contexts, args.max_bytes // 3, device)
            outputs, seconds, first_seconds = speculative_decoding(decoder, contexts, args.max_bytes, device)
            produced = sum(map(len, outputs))
            rate, stats = produced / seconds, decoder.stats
            same = ("yes" if outputs == plain else "NO") if temperature == 0 else "n/a"
            print(f"| {mode} | {draft_len} | {plain_rate:,.0f} | {rate:,.0f} | {rate / plain_rate:.2f}x | "
                  f"{produced / first_seconds:,.0f} | {stats.acceptance_rate:.1%} | {stats.bytes_per_call:.2f} | "
                  f"{drafter_rates[draft_len]:,.0f} | {same} |", flush=True)
    if args.phases:
        decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, args.draft_len[0], None, dtype=dtype)
        speculative_decoding(decoder, contexts, args.max_bytes, device)  # captures the graphs
        print(f"\nGreedy, draft len {args.draft_len[0]}: milliseconds per round\n")
        print("| part of a round | ms |\n|---|---:|")
        for name, ms in round_phases(decoder, contexts, args.max_bytes, device).items():
            print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()

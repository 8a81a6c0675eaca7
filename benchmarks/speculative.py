"""Speculative decoding vs plain byte decoding, on held-out prompts.

    python benchmarks/speculative.py BYTE_CKPT DRAFT_CKPT [--data DIR] [--prompts 8] [--max-bytes 256]

Prints one row per decoding mode (greedy, sampled) and draft length: plain bytes/s (generate.stream, CUDA
graph on GPU), speculative bytes/s, the speed-up, the acceptance rate, bytes per byte-model call, the
subword drafter's own greedy decoding speed in bytes/s (a step loop, no CUDA graph), and whether the greedy
outputs are identical to plain decoding.
"""

from __future__ import annotations

import argparse
import time

import torch

from mambabyte.checkpoint import load_pretrained, read_checkpoint_info
from mambabyte.data import load_corpus, shipped_corpus
from mambabyte.evaluate import separator_from_info
from mambabyte.generate import generate
from mambabyte.speculative import SpeculativeStats, load_drafter, speculative_stream


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def drafter_alone(drafter, tokenizer, contexts: list[bytes], steps: int, device: torch.device) -> float:
    """Bytes/s of the drafter decoding greedily by itself: ``steps`` tokens after each context."""
    produced, seconds = 0, 0.0
    for context in contexts:
        logits, state = drafter(torch.tensor([tokenizer.encode(context)], device=device), state=drafter.init_state(1),
                                return_state=True)
        token, tokens = logits[0, -1].argmax(), []

        def loop():
            nonlocal token, state
            for _ in range(steps):
                logits, state = drafter.step(token.view(1), state)
                token = logits[0].argmax()
                tokens.append(token)
            return torch.stack(tokens).tolist()  # the one transfer

        ids, elapsed = _timed(loop, device)
        produced += len(tokenizer.decode(ids))
        seconds += elapsed
    return produced / seconds


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
                        help="weights of both models (default: bfloat16 on CUDA, float32 elsewhere); greedy outputs "
                             "are identical to plain decoding in float32, bf16 can break near-ties differently")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
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

    generate(byte_model, prompts[0], 16, temperature=0, separator=separator)  # warm-up (kernels, CUDA graph)
    drafter_alone(drafter, tokenizer, [separator + prompts[0]], 8, device)
    drafter_rate = drafter_alone(drafter, tokenizer, [separator + p for p in prompts], args.max_bytes, device)
    print("| decoding | draft len | plain bytes/s | speculative bytes/s | speed-up | acceptance "
          "| bytes per byte-model call | drafter alone bytes/s | greedy identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for temperature in (0.0, args.temperature):
        plain, seconds = _timed(lambda: [generate(byte_model, p, args.max_bytes, temperature=temperature, seed=i,
                                                  separator=separator) for i, p in enumerate(prompts)], device)
        plain_rate = sum(map(len, plain)) / seconds
        mode = "greedy" if temperature == 0 else f"sampled T={temperature}"
        for draft_len in args.draft_len:
            stats = SpeculativeStats()

            def run(prompts=prompts, stats=stats):
                return [b"".join(speculative_stream(byte_model, drafter, tokenizer, p, args.max_bytes,
                                                    draft_len=draft_len, seed=i, separator=separator, stats=stats,
                                                    temperature=temperature))
                        for i, p in enumerate(prompts)]

            run(prompts[:1], SpeculativeStats())  # warm-up: kernels for these lengths, token-healing masks
            outputs, seconds = _timed(run, device)
            rate = sum(map(len, outputs)) / seconds
            same = ("yes" if outputs == plain else "NO") if temperature == 0 else "n/a"
            print(f"| {mode} | {draft_len} | {plain_rate:,.0f} | {rate:,.0f} | {rate / plain_rate:.2f}x | "
                  f"{stats.acceptance_rate:.1%} | {stats.bytes_per_call:.2f} | {drafter_rate:,.0f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()

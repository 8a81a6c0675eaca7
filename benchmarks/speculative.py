"""Speculative decoding vs plain byte decoding, on held-out prompts.

    python benchmarks/speculative.py BYTE_CKPT DRAFT_CKPT [--data DIR] [--prompts 8] [--max-bytes 256]

Prints, for greedy and sampled decoding: plain bytes/s (generate.stream, CUDA graph on GPU),
speculative bytes/s, the speed-up, the acceptance rate and bytes per byte-model call; whether the greedy
outputs are identical; and the subword drafter's own decoding speed in bytes/s.
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
    args = parser.parse_args()

    device = torch.device(args.device)
    byte_model = load_pretrained(args.byte_checkpoint, device=device)
    drafter, tokenizer = load_drafter(args.draft_checkpoint, device=device)
    if device.type == "cuda":
        byte_model, drafter = byte_model.to(torch.bfloat16), drafter.to(torch.bfloat16)
    separator = separator_from_info(read_checkpoint_info(args.byte_checkpoint))
    corpus = load_corpus(args.data)
    prompts = [corpus.document(i)[: args.prompt_bytes] for i in range(min(args.prompts, corpus.num_documents))]
    print(f"byte model {byte_model.num_parameters() / 1e6:.1f}M params, drafter {drafter.num_parameters() / 1e6:.1f}M "
          f"params (vocab {tokenizer.vocab_size}), {device}, {len(prompts)} prompts of {args.prompt_bytes} bytes, "
          f"{args.max_bytes} bytes each\n")

    generate(byte_model, prompts[0], 16, temperature=0, separator=separator)  # warm-up (kernels, CUDA graph)
    print("| decoding | draft len | bytes/s | speed-up | acceptance | bytes per byte-model call | greedy identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for temperature in (0.0, args.temperature):
        plain, seconds = _timed(lambda: [generate(byte_model, p, args.max_bytes, temperature=temperature, seed=i,
                                                  separator=separator) for i, p in enumerate(prompts)], device)
        plain_rate = sum(map(len, plain)) / seconds
        mode = "greedy" if temperature == 0 else f"sampled T={temperature}"
        print(f"| plain, {mode} | | {plain_rate:,.0f} | 1.00x | | 1.00 | |", flush=True)
        for draft_len in args.draft_len:
            stats = SpeculativeStats()

            def run():
                return [b"".join(speculative_stream(byte_model, drafter, tokenizer, p, args.max_bytes,
                                                    draft_len=draft_len, seed=i, separator=separator, stats=stats,
                                                    temperature=temperature))
                        for i, p in enumerate(prompts)]

            outputs, seconds = _timed(run, device)
            rate = sum(map(len, outputs)) / seconds
            same = "yes" if outputs == plain else "NO"
            print(f"| speculative, {mode} | {draft_len} | {rate:,.0f} | {rate / plain_rate:.2f}x | "
                  f"{stats.acceptance_rate:.1%} | {stats.bytes_per_call:.2f} | {same if temperature == 0 else 'n/a'} |",
                  flush=True)

    # the drafter alone: subword tokens decoded greedily, counted in bytes
    with torch.no_grad():
        state = drafter.init_state(1)
        logits, state = drafter(torch.tensor([tokenizer.encode(separator + prompts[0])], device=device), state=state,
                                return_state=True)
        token = logits[0, -1].argmax()
        produced = 0

        def drafter_loop():
            nonlocal token, state, produced
            for _ in range(args.max_bytes):
                logits, state = drafter.step(token.view(1), state)
                token = logits[0].argmax()
                produced += len(tokenizer.token_bytes[int(token)])

        _, seconds = _timed(drafter_loop, device)
    print(f"\nsubword drafter alone (greedy, step loop without CUDA graph): {produced / seconds:,.0f} bytes/s")


if __name__ == "__main__":
    main()

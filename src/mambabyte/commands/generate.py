"""`mambabyte generate CKPT`: continue a prompt, streaming the bytes to stdout as they are generated."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from mambabyte.errors import UserError

HELP = "Generate bytes from a checkpoint, streamed to stdout (sampling controls, stop strings, batched samples)."


def add_sampling_arguments(parser: argparse.ArgumentParser, max_bytes: int) -> None:
    """The options `generate` and `chat` share."""
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    parser.add_argument("--max-bytes", type=int, default=max_bytes,
                        help=f"bytes to generate at most (default {max_bytes})")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest bytes; 0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="keep the likeliest bytes whose mass reaches p, in (0, 1]; 1 = off (default)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop bytes less likely than p times the likeliest; 0 = off (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 makes bytes already in the text less likely; 1 = off (default)")
    parser.add_argument("--utf8", choices=("any", "strict"), default="any",
                        help="any (default): bytes as sampled, invalid UTF-8 possible; "
                             "strict: only bytes that keep the output valid UTF-8")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same output")
    parser.add_argument("--stop", action="append", default=None, metavar="STRING",
                        help="stop before this string (repeatable; it is not printed); use $'\\n' for a newline")
    parser.add_argument("--raw", action="store_true",
                        help="write the bytes as they are (default: UTF-8 text, invalid bytes shown as U+FFFD)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (default auto: bfloat16 on CUDA (MambaByte: bf16 weights, others: autocast), "
                             "float32 elsewhere)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="do not capture the decoding step in a CUDA graph")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, max_bytes=256)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT",
                        help="the text to continue (default: stdin if it is not a terminal, "
                             "else nothing: a document from its start)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="continue the bytes of this file")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="N samples of the prompt, generated as one batch (seeds SEED..SEED+N-1); "
                             "with N > 1 each is printed once all are done")
    draft = parser.add_argument_group("speculative decoding")
    draft.add_argument("--draft", metavar="DRAFT_CKPT",
                       help="a subword drafter checkpoint (trained with `train --tokenizer`): it proposes, this "
                            "model verifies; greedy output is identical to plain decoding")
    draft.add_argument("--draft-len", type=int, default=4, metavar="K", help="subword tokens per draft (default 4)")
    draft.add_argument("--draft-report", action="store_true",
                       help="print acceptance rate and bytes per byte-model call to stderr at the end")


def load_for_generation(args: argparse.Namespace) -> tuple:
    """(model, the options of mambabyte.generate: sampling, seed, separator...) from the shared options."""
    import torch

    from mambabyte.checkpoint import load_pretrained, read_checkpoint_info
    from mambabyte.evaluate import separator_from_info
    from mambabyte.generate import Sampling

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, utf8=args.utf8)
    Sampling(**sampling)  # bad options are refused before the checkpoint is loaded
    if args.max_bytes < 0:
        raise UserError(f"--max-bytes must be >= 0, got {args.max_bytes}")
    separator = separator_from_info(read_checkpoint_info(args.checkpoint))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_pretrained(args.checkpoint, device=device)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"cannot load {args.checkpoint} on {device}: {str(error).splitlines()[0]}") from None
    on_cuda = next(model.parameters()).is_cuda
    if model.config.arch == "mambabyte" and (args.dtype == "bfloat16" or (args.dtype == "auto" and on_cuda)):
        model = model.to(torch.bfloat16)  # decoding reads every weight per byte; the SSM state stays fp32
    options = dict(sampling, seed=args.seed, separator=separator, cuda_graph=not args.no_cuda_graph,
                   dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    return model, options


def stop_strings(args: argparse.Namespace, default: Iterable[bytes] = ()) -> list[bytes]:
    """--stop values as bytes (the command line's own bytes, even when they are not valid UTF-8)."""
    return [os.fsencode(stop) for stop in args.stop] if args.stop is not None else list(default)


def write_stream(chunks: Iterable[bytes], raw: bool) -> None:
    """Writes chunks to stdout as they come: bytes as they are, or UTF-8 text through an incremental decoder."""
    from mambabyte.generate import utf8_text_chunks

    if raw:
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    else:
        for text in utf8_text_chunks(chunks):
            sys.stdout.write(text)
            sys.stdout.flush()


def _read_prompt(args: argparse.Namespace) -> bytes:
    if args.prompt is not None:
        return os.fsencode(args.prompt)
    if args.prompt_file is not None:
        return Path(args.prompt_file).read_bytes()
    if not sys.stdin.isatty():
        return sys.stdin.buffer.read()
    return b""


def run(args: argparse.Namespace) -> int:
    from mambabyte.generate import generate_batch, stream

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, options = load_for_generation(args)
    prompt = _read_prompt(args)
    stops = stop_strings(args)
    if args.draft:
        return _run_speculative(args, model, options, prompt, stops)
    if args.num_samples == 1:
        write_stream(stream(model, prompt, args.max_bytes, stop=stops, **options), args.raw)
        if not args.raw:
            print()
        return 0
    samples = generate_batch(model, [prompt] * args.num_samples, args.max_bytes, stop=stops, **options)
    for index, sample in enumerate(samples):
        if args.raw:  # samples framed like documents in a corpus: each followed by the separator
            write_stream([sample, options["separator"]], raw=True)
        else:
            print(f"--- sample {index + 1} of {len(samples)} (seed {args.seed + index}) ---")
            write_stream([sample], raw=False)
            print()
    return 0


def _run_speculative(args: argparse.Namespace, model, options: dict, prompt: bytes, stops: list[bytes]) -> int:
    from mambabyte.speculative import SpeculativeStats, load_drafter, speculative_stream

    if args.num_samples != 1:
        raise UserError("--draft generates one sample at a time (--num-samples 1)")
    drafter, tokenizer = load_drafter(args.draft, device=next(model.parameters()).device)
    sampling = {k: options[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "utf8")}
    stats = SpeculativeStats()
    chunks = speculative_stream(model, drafter, tokenizer, prompt, args.max_bytes, draft_len=args.draft_len,
                                seed=args.seed, stop=stops, separator=options["separator"], stats=stats,
                                cuda_graph=options["cuda_graph"], dtype=options["dtype"], **sampling)
    write_stream(chunks, args.raw)
    if not args.raw:
        print()
    if args.draft_report:
        print(f"speculative: {stats.generated_bytes} bytes in {stats.rounds} rounds, acceptance "
              f"{stats.acceptance_rate:.1%}, {stats.bytes_per_call:.2f} bytes per byte-model call", file=sys.stderr)
    return 0

"""`mambabyte eval CKPT --data PATH`: bits per byte of a checkpoint beside gzip, bzip2, xz and zstd."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mambabyte.errors import UserError

HELP = "Bits per byte of a checkpoint on your data, beside general-purpose compressors on the same bytes."

WORD_PERPLEXITY_CONVENTION = "2^(bits_per_byte * num_bytes / num_words), words = whitespace-separated"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="file, folder, glob, .jsonl/.gz or local Hugging Face dataset directory")
    parser.add_argument("--text-field", default="text", help="field holding the text in JSONL/datasets (default: text)")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="bytes per forward pass (default 1024; the state is carried across windows); "
                             "with --stride, the sliding window's length (default: the training length)")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="sliding-window evaluation (no state carried): windows of W bytes every S bytes, "
                             "each byte scored once with at least W-S bytes of context")
    parser.add_argument("--max-bytes", type=int, default=None, metavar="N",
                        help="evaluate only the first N bytes of the data (documents in order, the last cut short)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents (or windows) per forward pass")
    parser.add_argument("--extrapolation", action="store_true",
                        help="also print BPB by position in the document (powers of two)")
    parser.add_argument("--plot", metavar="PNG",
                        help="write the BPB-by-position plot to this PNG (implies --extrapolation)")
    parser.add_argument("--train-length", type=int, default=None, metavar="BYTES",
                        help="training context length to mark in the table and plot "
                             "(default: the checkpoint's metadata 'window', if any)")
    parser.add_argument("--no-compressors", action="store_true", help="skip the compressor comparison")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_plot_path(path: str) -> None:
    """Refuse an unwritable plot path before spending time on the evaluation."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write plot {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write plot {path}: folder {parent} is not writable")


def _training_length(args: argparse.Namespace, info: dict) -> int | None:
    if args.train_length is not None:
        return args.train_length
    window = info.get("window")
    return window if isinstance(window, int) and window > 0 else None


def _print_report(report: dict) -> None:
    print(f"{report['data']}: {report['num_documents']:,} documents, {report['num_bytes']:,} bytes, "
          f"{report['num_words']:,} words")
    if report["mode"] == "state":
        print(f"mode: whole documents, state carried across windows of {report['window']:,} bytes")
    else:
        print(f"mode: sliding window of {report['window']:,} bytes, stride {report['stride']:,}")
    rows = {f"model ({report['checkpoint']})": report["bits_per_byte"], **report["compressors"]}
    width = max(map(len, rows)) + 2
    print(f"\n{'':<{width}}bits/byte")
    for name, value in sorted(rows.items(), key=lambda item: item[1]):
        print(f"{name:<{width}}{value:.4f}")
    beaten = [name for name, value in report["compressors"].items() if report["bits_per_byte"] < value]
    if report["compressors"]:
        print(f"the model beats {len(beaten)} of {len(report['compressors'])} compressors"
              + (f" ({', '.join(beaten)})" if beaten else ""))
    perplexity = report["word_perplexity"]
    print(f"\nword-level perplexity {perplexity:.6g}" if perplexity is not None else "\nword-level perplexity: n/a",
          f"(derived from BPB: {WORD_PERPLEXITY_CONVENTION})")
    if report.get("by_position"):
        print(f"\n{'position in document':<24}{'bytes':>14}{'bits/byte':>11}")
        for bucket in report["by_position"]:
            beyond = report["train_length"] is not None and bucket["start"] >= report["train_length"]
            print(f"{bucket['start']:>10,} - {bucket['end'] - 1:<11,}{bucket['num_bytes']:>14,}"
                  f"{bucket['bits_per_byte']:>11.4f}" + ("  beyond training length" if beyond else ""))
    if report.get("plot"):
        print(f"\nplot: {report['plot']}")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from mambabyte.checkpoint import load_pretrained, read_checkpoint_info
    from mambabyte.compressors import compressor_bits_per_byte
    from mambabyte.data import load_corpus
    from mambabyte.evaluate import (DEFAULT_WINDOW, count_words, evaluate, plot_bits_per_byte_by_position,
                                    first_bytes, separator_from_info, word_perplexity)

    if args.plot:
        _check_plot_path(args.plot)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = read_checkpoint_info(args.checkpoint)
    separator = separator_from_info(info)
    try:
        model = load_pretrained(args.checkpoint, device=device)
    except (RuntimeError, AssertionError) as error:  # e.g. CUDA asked for on a machine without it
        raise UserError(f"cannot load {args.checkpoint} on {device}: {str(error).splitlines()[0]}") from None
    documents = load_corpus(args.data, text_field=args.text_field).documents()
    documents = list(documents) if args.max_bytes is None else first_bytes(documents, args.max_bytes)
    train_length = _training_length(args, info)
    window = args.window
    if window is None:  # a sliding window should match the training length; otherwise it only bounds memory
        window = train_length if args.stride is not None and train_length else DEFAULT_WINDOW
    result = evaluate(model, documents, separator=separator, window=window, stride=args.stride,
                      batch_size=args.batch_size, progress=not args.quiet)
    num_words = count_words(documents)
    report = {
        "bits_per_byte": result.bits_per_byte,
        "num_bytes": result.num_bytes,
        "num_documents": result.num_documents,
        "num_words": num_words,
        "word_perplexity": word_perplexity(result.bits_per_byte, result.num_bytes, num_words),
        "word_perplexity_convention": WORD_PERPLEXITY_CONVENTION,
        "mode": result.mode,
        "window": result.window,
        "stride": result.stride,
        "separator": separator.decode("latin-1"),
        "compressors": {} if args.no_compressors else compressor_bits_per_byte(b"".join(documents)),
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "parameters": model.num_parameters(),
        "device": device,
        "train_length": train_length,
    }
    if args.extrapolation or args.plot:
        report["by_position"] = [dataclasses.asdict(bucket) for bucket in result.by_position]
    if args.plot:
        references = {name: report["compressors"][name] for name in ("xz -9",) if name in report["compressors"]}
        report["plot"] = str(plot_bits_per_byte_by_position(result.by_position, args.plot, train_length=train_length,
                                                            references=references))
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 0

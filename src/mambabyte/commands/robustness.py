"""`mambabyte robustness --byte CKPT --subword CKPT --data PATH`: both models on clean and noisy text, in BPB."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mambabyte.errors import UserError
from mambabyte.noise import CORRUPTIONS

HELP = "Bits per byte of a byte model and a subword model on clean and character-corrupted text (drop, repeat, ...)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--byte", required=True, metavar="CKPT", help="byte-level checkpoint directory")
    parser.add_argument("--subword", required=True, metavar="CKPT",
                        help="subword checkpoint directory (holding tokenizer.json beside config.json)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="held-out text: file, folder, glob, .jsonl/.gz or local Hugging Face dataset directory")
    parser.add_argument("--text-field", default="text", help="field holding the text in JSONL/datasets (default: text)")
    parser.add_argument("--kinds", default=",".join(CORRUPTIONS), metavar="KIND,...",
                        help=f"comma-separated corruptions (default: all of {', '.join(CORRUPTIONS)})")
    parser.add_argument("--p", type=float, nargs="+", default=None, metavar="P",
                        help="corruption rate(s) in [0, 1]; every kind is run at each one "
                             "(default: one rate per kind, see docs/robustness.md)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0): same seed, same corrupted text")
    parser.add_argument("--max-bytes", type=int, default=None, metavar="N",
                        help="use only the first N bytes of the data (documents in order, the last cut short)")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="positions per forward pass (default 1024); the state is carried: it only bounds memory")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown table to FILE")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart (BPB and relative degradation) to PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_model(directory: str, device: str):
    from mambabyte.checkpoint import load_pretrained

    try:
        return load_pretrained(directory, device=device)
    except (RuntimeError, AssertionError) as error:  # e.g. CUDA asked for on a machine without it
        raise UserError(f"cannot load {directory} on {device}: {str(error).splitlines()[0]}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from mambabyte.checkpoint import read_checkpoint_info
    from mambabyte.commands.eval import _check_plot_path
    from mambabyte.data import load_corpus
    from mambabyte.evaluate import DEFAULT_WINDOW, first_bytes, separator_from_info
    from mambabyte.robustness import corruption_grid, format_markdown, plot_robustness, robustness_table
    from mambabyte.subword import SubwordTokenizer

    corruptions = corruption_grid([kind.strip() for kind in args.kinds.split(",") if kind.strip()], args.p)
    if args.plot:
        _check_plot_path(args.plot)
    if args.markdown and not Path(args.markdown).expanduser().resolve().parent.is_dir():
        raise UserError(f"cannot write table {args.markdown}: its folder does not exist")
    byte_info, subword_info = read_checkpoint_info(args.byte), read_checkpoint_info(args.subword)
    tokenizer = SubwordTokenizer.load(args.subword)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    byte_model, subword_model = _load_model(args.byte, device), _load_model(args.subword, device)
    if byte_model.config.vocab_size != 256:
        raise UserError(f"--byte {args.byte} has a vocabulary of {byte_model.config.vocab_size}, not 256 bytes")
    documents = load_corpus(args.data, text_field=args.text_field).documents()
    documents = list(documents) if args.max_bytes is None else first_bytes(documents, args.max_bytes)
    byte_separator, subword_separator = separator_from_info(byte_info), separator_from_info(subword_info)
    rows = robustness_table(byte_model, subword_model, tokenizer, documents, corruptions, seed=args.seed,
                            byte_separator=byte_separator, subword_separator=subword_separator,
                            window=args.window or DEFAULT_WINDOW, batch_size=args.batch_size,
                            progress=not args.quiet)
    table = format_markdown(rows)
    report = {
        "rows": [dataclasses.asdict(row) for row in rows],
        "byte_checkpoint": str(args.byte),
        "subword_checkpoint": str(args.subword),
        "byte_parameters": byte_model.num_parameters(),
        "subword_parameters": subword_model.num_parameters(),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "data": str(args.data),
        "num_documents": len(documents),
        "seed": args.seed,
        "byte_separator": byte_separator.decode("latin-1"),
        "subword_separator": subword_separator.decode("latin-1"),
        "device": device,
    }
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write(table)
        report["markdown"] = args.markdown
    if args.plot:
        report["plot"] = str(plot_robustness(rows, args.plot))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.data}: {len(documents):,} documents; byte model {report['byte_parameters']:,} parameters, "
          f"subword model {report['subword_parameters']:,} parameters ({tokenizer.vocab_size:,} tokens)\n")
    print(table, end="")
    for key in ("markdown", "plot"):
        if key in report:
            print(f"{key}: {report[key]}")
    return 0

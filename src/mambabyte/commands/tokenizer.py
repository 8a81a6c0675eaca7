"""`mambabyte tokenizer train`: a byte-level BPE vocabulary learned locally from your corpus."""

from __future__ import annotations

import argparse

HELP = "Train a byte-level BPE tokenizer (for the subword drafter / baseline) on a corpus; nothing is downloaded."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="learn a vocabulary from --data and save it in --out")
    train.add_argument("--data", required=True, help="file, folder, glob or dataset directory (as for `train`)")
    train.add_argument("--text-field", default="text", help="JSONL/dataset field holding the text (default: text)")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, > 256 (default: 4096)")
    train.add_argument("--out", required=True, help="directory to write tokenizer.json into")


def run(args: argparse.Namespace) -> int:
    from mambabyte.data import load_corpus
    from mambabyte.subword import SubwordTokenizer

    corpus = load_corpus(args.data, text_field=args.text_field)
    tokenizer = SubwordTokenizer.train(corpus.documents(), args.vocab_size)
    out = tokenizer.save(args.out)
    raw = sum(len(doc) for doc in corpus.documents())
    tokens = sum(len(tokenizer.encode(doc)) for doc in corpus.documents())
    print(f"tokenizer with {tokenizer.vocab_size} tokens written to {out}; "
          f"{raw / max(1, tokens):.2f} bytes per token on {corpus.num_documents} documents")
    return 0

"""`mambabyte import-hf`: a transformers Mamba directory (vocab 256) as a MambaByte checkpoint."""

from __future__ import annotations

import argparse

NAME = "import-hf"
HELP = "Convert a byte-level (vocab 256) transformers Mamba directory into a MambaByte checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="DIR", help="a directory MambaForCausalLM.from_pretrained loads")
    parser.add_argument("outdir", metavar="OUTDIR", help="the checkpoint directory to write (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    from mambabyte.checkpoint import save_pretrained
    from mambabyte.hf import import_hf

    save_pretrained(import_hf(args.hf_dir), args.outdir, metadata={"imported_from": str(args.hf_dir)})
    print(f"wrote {args.outdir}")
    return 0

"""`mambabyte export-hf`: a checkpoint as a transformers MambaForCausalLM directory."""

from __future__ import annotations

import argparse

NAME = "export-hf"
HELP = "Write a MambaByte checkpoint as a directory transformers.MambaForCausalLM.from_pretrained loads."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="a mambabyte checkpoint directory")
    parser.add_argument("outdir", metavar="OUTDIR", help="the Hugging Face directory to write (replaced atomically)")


def run(args: argparse.Namespace) -> int:
    from mambabyte.checkpoint import load_pretrained
    from mambabyte.hf import export_hf

    export_hf(load_pretrained(args.checkpoint), args.outdir)
    print(f"wrote {args.outdir}")
    return 0

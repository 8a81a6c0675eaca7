"""`mambabyte corrupt`: add character-level noise to text (stdin -> stdout)."""

from __future__ import annotations

import argparse
import sys

from mambabyte.noise import CORRUPTIONS

HELP = "Corrupt text from stdin with character-level noise (drop, repeat, swap, case, antspeak) to stdout."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True, choices=sorted(CORRUPTIONS), help="the corruption")
    parser.add_argument("--p", type=float, required=True,
                        help="probability per character (per word for antspeak); for drop, the share removed")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same output")


def run(args: argparse.Namespace) -> int:
    from mambabyte.noise import corrupt

    sys.stdout.buffer.write(corrupt(sys.stdin.buffer.read(), args.kind, args.p, args.seed))
    sys.stdout.buffer.flush()
    return 0

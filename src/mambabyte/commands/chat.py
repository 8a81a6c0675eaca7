"""`mambabyte chat CKPT`: a conversation that keeps the model's state between turns."""

from __future__ import annotations

import argparse
import sys

from mambabyte.commands.generate import add_sampling_arguments, load_for_generation, stop_strings, write_stream

HELP = "Talk with a checkpoint line by line; the state is kept, so each turn reads only its new bytes."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, max_bytes=256)
    parser.epilog = ("Each line you type is fed to the model with its newline; the reply runs until a stop string "
                     "(default: a newline) or --max-bytes. End with Ctrl-D.")


def run(args: argparse.Namespace) -> int:
    from mambabyte.generate import Conversation

    model, options = load_for_generation(args)
    conversation = Conversation(model, **options)
    stops = stop_strings(args, default=[b"\n"])
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        write_stream(conversation.reply(line, args.max_bytes, stops), args.raw)
        if args.raw:
            sys.stdout.buffer.write(b"\n")
            sys.stdout.buffer.flush()
        else:
            print(flush=True)

"""`mambabyte <command>`: a thin shell over the library.

Every module in ``mambabyte.commands`` is a subcommand: it defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. A ``UserError`` (or a bad path) ends the
command with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from mambabyte import __version__, commands
from mambabyte.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambabyte",
        description="Token-free byte-level Mamba language models: train, evaluate in bits per byte, generate.",
    )
    parser.add_argument("--version", action="version", version=f"mambabyte {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"mambabyte.commands.{info.name}")
        name = getattr(module, "NAME", info.name.replace("_", "-"))
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as error:
        print(f"mambabyte {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as error:
        print(f"mambabyte {args.command}: error: {error.strerror or error}: {error.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mambabyte {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

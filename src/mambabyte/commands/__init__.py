"""One module per `mambabyte` subcommand (discovered by mambabyte.cli)."""

"""What every `sfumato <command>` is: a name, a one-line help, its flags and what it does.

A command adds its own flags to its own sub-parser (`add_arguments`) and runs on the parsed
namespace (`run`, returning the exit status); sfumato.cli keeps the registry and dispatches. A
command whose parser has an `overrides` positional also takes dotted `key=value` overrides anywhere
on the line (before or after its flags), as every config-driven command does.
"""

from __future__ import annotations

import argparse
import sys

VERBOSE_HELP = "also show Ray's and the libraries' INFO logs and the known-harmless warnings (quiet by default)"
OVERRIDES_HELP = "dotted overrides, e.g. data.shards.resolutions_px=[32,64]"


class Command:
    """One `sfumato <name>` command."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags and positionals to its own sub-parser."""

    def finish_parsing(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
        """A last parsing step after the common one (bench parses its own flags here); errors exit
        through `parser.error`."""
        return args

    def run(self, args: argparse.Namespace) -> int:
        """Do it; the exit status (2: refused, with one line on stderr saying why)."""
        raise NotImplementedError


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` plus dotted overrides: how a config-driven command is told what to do."""
    parser.add_argument("--config", required=required, help="YAML config, e.g. configs/pilot.yaml")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def refuse(message: object) -> int:
    """A refusal the user can act on: one line on stderr, exit status 2 (no traceback)."""
    print(f"sfumato: {message}", file=sys.stderr)
    return 2

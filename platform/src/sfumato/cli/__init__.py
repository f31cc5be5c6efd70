"""`sfumato <command>`: every command a registered Command (sfumato.cli.command) with its own
flags and `run`; this module keeps the registry, builds one parser from it and dispatches.

    config                         show or validate a config        (tool_commands)
    ingest ... align               one per registered stage, the    (stage_commands: sfumato.stages
                                   function the pipeline runs        is the one definition of each)
    report, pipeline               a run's documents; every stage
    pairs, abtest, serve           people and endpoints             (tool_commands)
    bench WHAT                     one benchmark, its own flags     (bench: sfumato/bench/WHAT.py)

Config-driven commands take `--config FILE` plus dotted `key=value` overrides anywhere on the
line; knobs live in the config tree, not in flags. The one flag every command takes, `--verbose`,
is about the console, not the run (sfumato.console).
"""

from __future__ import annotations

import argparse

from sfumato.cli import bench, stage_commands, tool_commands
from sfumato.cli.command import VERBOSE_HELP, Command
from sfumato.console import configure_logging, set_verbose

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in [
        tool_commands.ConfigCommand(),
        *stage_commands.commands(),
        tool_commands.Pairs(),
        tool_commands.AbTest(),
        tool_commands.Serve(),
        bench.Bench(),
    ]
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfumato", description="`sfumato <command>`: the stages, the whole pipeline, serving and benchmarks"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        # Also after the command: `sfumato pipeline --verbose ...`.
        child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Command, argparse.Namespace]:
    """The command a line asks for and its arguments, without running it (argparse errors exit 2)."""
    parser = build_parser()
    # Overrides may come before or after the flags; anything else unknown is an error.
    args, rest = parser.parse_known_args(argv)
    stray = [item for item in rest if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = COMMANDS[args.command]
    return command, command.finish_parsing(args, parser)


def main(argv: list[str] | None = None) -> int:
    command, args = parse_args(argv)
    if args.verbose:
        set_verbose()
    configure_logging()
    return command.run(args)

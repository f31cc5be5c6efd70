"""`sfumato <stage>`: a command for every registered stage (sfumato.stages.REGISTRY), plus
`sfumato pipeline` (all of them, in order) and `sfumato report`.

A stage command calls the registered stage function, the one the pipeline calls: the same
records, reports, exports and errors, whichever way it is reached. The command only finds the
config (a --config file, or a run folder's config.yaml) and turns its flags into the stage's
options (a checkpoint, a parent run, the dedup review); it prints the stage's StageResult values
as JSON, `{"<stage>": {...}}`, and logs its line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sfumato.cli.command import Command, add_config_arguments, refuse
from sfumato.config import Config, ConfigError, load_config, load_run_config
from sfumato.layout import RunFolder
from sfumato.stages import REGISTRY, Stage

log = logging.getLogger(__name__)


def first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


class StageCommand(Command):
    """`sfumato <stage> --config FILE [key=value ...]`: the registered stage on that config."""

    refuse_when_off = False
    """Refuse (exit 2) when the stage is off for the config because it cannot run at all then
    (train without a train section, cache with nothing to cache). The pipeline's switches
    (pipeline.evaluate and the like) never stop a stage asked for by name."""

    def __init__(self, name: str):
        self.name = name

    @property
    def stage(self) -> Stage:
        return REGISTRY[self.name]

    @property
    def help(self) -> str:
        return first_paragraph(self.stage.run.__doc__)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)

    def config(self, args: argparse.Namespace) -> Config:
        """The config the stage runs on, overrides applied and validated."""
        return load_config(args.config, args.overrides)

    def source(self, args: argparse.Namespace) -> str:
        """Where the config came from, for messages."""
        return args.config

    def options(self, args: argparse.Namespace) -> dict:
        """The stage function's keyword options, from this command's flags."""
        return {}

    def run(self, args: argparse.Namespace) -> int:
        try:
            cfg = self.config(args)
        except (ConfigError, FileNotFoundError) as err:
            return refuse(err)
        off = self.stage.enabled(cfg) if self.refuse_when_off else None
        if off:
            return refuse(f"{self.name} is off for {self.source(args)}: {off}")
        try:
            result = self.stage.run(cfg, **self.options(args))
        except ConfigError as err:  # the pipeline's command refuses these alike
            return refuse(err)
        log.info(result.line)
        print(json.dumps({self.name: result.values}, indent=2, default=str))
        return 0


class Dedup(StageCommand):
    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "--review",
            type=int,
            default=0,
            metavar="N",
            help="also write dedup_review.png: the N clusters nearest the threshold",
        )

    def options(self, args):
        return {"review": args.review}


class Cache(StageCommand):
    refuse_when_off = True


class Tune(StageCommand):
    """The sweep; with no completed trial to train from it fails, as the pipeline's stage does."""

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "--resume", action="store_true", help="continue the sweep in tune.output_dir (finished trials are kept)"
        )

    def options(self, args):
        return {"resume": args.resume}


class Train(StageCommand):
    refuse_when_off = True

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", help="YAML config with a train section")
        source.add_argument(
            "--resume", metavar="RUN_DIR", help="continue a run from its config.yaml and last checkpoint"
        )
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.stages.0.steps=200")

    def config(self, args):
        return load_config(RunFolder(args.resume).require().config if args.resume else args.config, args.overrides)

    def source(self, args):
        return args.config or args.resume


def run_folder_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """A run folder's config.yaml with overrides, its train.output_dir the folder named (where the
    stage reads and writes, even if the folder was moved after training)."""
    return load_run_config(run_dir, [*overrides, f"train.output_dir={Path(run_dir).resolve()}"])


class RunFolderStage(StageCommand):
    """`sfumato evaluate|export RUN_DIR [--checkpoint step-N] [key=value ...]`: the stage on a
    trained run folder's own config (plus overrides)."""

    def add_arguments(self, parser):
        parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (train.output_dir)")
        parser.add_argument("--checkpoint", default=None, help="e.g. step-00000500 (default: the newest)")
        parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {self.name}.int8=false")

    def config(self, args):
        return run_folder_config(args.run_dir, args.overrides)

    def source(self, args):
        return args.run_dir

    def options(self, args):
        return {"checkpoint": args.checkpoint, "overrides": args.overrides}


class PostTraining(StageCommand):
    """`sfumato finetune|align --config FILE [--from RUN_DIR] ...`: the lineage resolved (errors
    before any work), trained, then its report and export, as in the pipeline."""

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "--from",
            dest="parent",
            default=None,
            metavar="RUN_DIR",
            help=f"the parent run folder (default: {self.name}.parent, else the config's train.output_dir)",
        )
        parser.add_argument(
            "--checkpoint", default=None, help="the parent's checkpoint, e.g. step-00000500 (default: newest)"
        )
        parser.add_argument(
            "--pretrained",
            default=None,
            metavar="FOLDER_OR_HUB_ID",
            help="start from a diffusers export folder or hub id instead of a run",
        )

    def options(self, args):
        return {
            "parent": Path(args.parent) if args.parent else None,
            "checkpoint": args.checkpoint,
            "pretrained": args.pretrained,
        }


class Align(PostTraining):
    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "--pairs",
            default=None,
            metavar="PAIRS_PARQUET",
            help="the preference pairs (`sfumato pairs`; default: align.pairs)",
        )

    def options(self, args):
        return {**super().options(args), "pairs": Path(args.pairs) if args.pairs else None}


# Stages whose command takes more than --config; every other registered stage gets a StageCommand.
COMMAND_CLASSES: dict[str, type[StageCommand]] = {
    "dedup": Dedup,
    "cache": Cache,
    "tune": Tune,
    "train": Train,
    "evaluate": RunFolderStage,
    "export": RunFolderStage,
    "finetune": PostTraining,
    "align": Align,
}


class Report(Command):
    name = "report"
    help = "rewrite RUN_DIR/report.md, model_card.md and the data folder's dataset_card.md"

    def add_arguments(self, parser):
        parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (train.output_dir)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides of its config.yaml")

    def run(self, args):
        from sfumato.evaluate.cards import write_run_documents

        try:
            cfg = run_folder_config(args.run_dir, args.overrides)
        except (ConfigError, FileNotFoundError) as err:
            return refuse(err)
        print(json.dumps(write_run_documents(Path(args.run_dir), cfg.data.output_dir), indent=2, default=str))
        return 0


class Pipeline(Command):
    name = "pipeline"
    help = (
        "the whole job: ingest, safety, dedup, caption, shards, tune, train, evaluate, export "
        "(stages complete for the config are skipped)"
    )

    def add_arguments(self, parser):
        add_config_arguments(parser)

    def run(self, args):
        from sfumato.pipeline import run_pipeline

        try:
            cfg = load_config(args.config, args.overrides)
        except (ConfigError, FileNotFoundError) as err:
            return refuse(err)
        try:
            run_pipeline(cfg)
        except ConfigError as err:
            return refuse(err)
        return 0


def commands() -> list[Command]:
    """One command per registered stage, in the registry's order, then report and pipeline."""
    stages = [COMMAND_CLASSES.get(name, StageCommand)(name) for name in REGISTRY]
    return [*stages, Report(), Pipeline()]

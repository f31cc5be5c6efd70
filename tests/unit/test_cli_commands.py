"""The command line, parsed without running anything: every command is a registered command, each
registered stage has one, every `sfumato bench` line README.md, BENCHMARKS.md and docs/ quote
still parses with the bench's own flags, and a flag means one thing per bench."""

import re
import shlex

import pytest

from helpers import REPO
from sfumato.cli import COMMANDS, main, parse_args
from sfumato.cli.bench import BENCHES, bench_parser
from sfumato.cli.stage_commands import StageCommand
from sfumato.stages import REGISTRY


def _quoted_bench_lines() -> list[str]:
    """`sfumato bench <what> ...` as the docs quote it: lines of fenced blocks and inline code
    spans (which may wrap), with `[optional]` brackets, `a|b` alternatives and `# comments` read as
    a user would type the first choice. (`sfumato bench` alone names the family, not a command.)"""
    found = []
    for path in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", inline)]
        lines = [line for block in blocks for line in block.splitlines()] + spans
        found += [line.split("#")[0].strip() for line in lines if re.match(r"sfumato bench [a-z]", line.strip())]
    return found


def _typed(line: str) -> list[str]:
    line = line.replace("[", " ").replace("]", " ")
    words = [word.split("|")[0] for word in shlex.split(line)]
    assert words[:2] == ["sfumato", "bench"], line
    return words[1:]


def test_the_docs_quote_every_bench_and_each_quoted_line_parses():
    lines = _quoted_bench_lines()
    assert {_typed(line)[1] for line in lines} == set(BENCHES), (
        "a bench the docs never show, or one they show that does not exist"
    )
    for line in lines:
        command, args = parse_args(_typed(line))
        assert command.name == "bench" and args.what == _typed(line)[1], line


def test_quoted_flags_keep_their_meaning_and_defaults():
    _, ingest = parse_args(["bench", "ingest", "--images", "5000", "--memory-scale", "10"])
    assert (ingest.images, ingest.memory_scale, ingest.workers, ingest.datasets) == (5000, 10, 2, "../shared/datasets")
    _, serve = parse_args(["bench", "serve", "--model", "unet-tiny", "--duration", "15"])
    assert (serve.model, serve.duration, serve.serve_steps) == ("unet-tiny", 15.0, 10)
    _, finetune = parse_args(
        shlex.split(
            "bench finetune --config configs/pilot.yaml --from runs/pilot/train --samples 256 --sides lora "
            "finetune.lora.learning_rate=0.005 finetune.lora.rank=4 finetune.lora.conv=true"
        )
    )
    assert (finetune.config, finetune.parent, finetune.samples, finetune.sides) == (
        "configs/pilot.yaml",
        "runs/pilot/train",
        256,
        "lora",
    )
    assert finetune.overrides == [
        "finetune.lora.learning_rate=0.005",
        "finetune.lora.rank=4",
        "finetune.lora.conv=true",
    ]
    _, align = parse_args(shlex.split("bench align --from runs/pilot/train --votes 400 --eval-votes 200 --samples 256"))
    assert (align.parent, align.votes, align.eval_votes, align.samples, align.pairs) == (
        "runs/pilot/train",
        400,
        200,
        256,
        None,
    )
    # --steps is a bench's own: train's optimizer steps per side, tune's proxy steps per trial.
    assert parse_args(["bench", "train"])[1].steps == parse_args(["bench", "tune"])[1].steps == 40
    # Data and the repository come from arguments, relative to the working directory.
    _, quality = parse_args(["bench", "quality", "--cpu-seconds", "480"])
    assert (quality.cpu_seconds, quality.datasets, quality.repo) == (480.0, "../shared/datasets", ".")


def test_a_flag_of_another_bench_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["bench", "export", "--votes", "400"])
    assert exit_.value.code == 2 and "--votes" in capsys.readouterr().err


def test_every_bench_module_owns_its_flags():
    for what in BENCHES:
        assert any(action.dest == "out" for action in bench_parser(what)._actions), what


def test_every_registered_stage_is_a_command_that_runs_the_registered_function():
    for name, stage in REGISTRY.items():
        assert isinstance(COMMANDS[name], StageCommand) and COMMANDS[name].stage is stage
    assert {"config", "pipeline", "report", "pairs", "abtest", "serve", "bench"} <= set(COMMANDS)


def test_stage_flags_become_the_stages_options():
    command, args = parse_args(["evaluate", "runs/x", "evaluate.num_samples=8", "--checkpoint", "step-00000005"])
    assert command.options(args) == {"checkpoint": "step-00000005", "overrides": ["evaluate.num_samples=8"]}
    command, args = parse_args(
        ["align", "--config", "c.yaml", "--from", "runs/x", "--pairs", "p.parquet", "align.beta=5"]
    )
    options = command.options(args)
    assert str(options["parent"]) == "runs/x" and str(options["pairs"]) == "p.parquet" and options["pretrained"] is None
    assert args.overrides == ["align.beta=5"]
    command, args = parse_args(["dedup", "--config", "c.yaml", "--review", "3", "seed=1"])
    assert command.options(args) == {"review": 3} and args.overrides == ["seed=1"]


def test_a_missing_config_is_refused_in_one_line(capsys, tmp_path):
    assert main(["ingest", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2

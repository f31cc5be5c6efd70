"""The entry points a user types: `jobs/pipeline.py` (what `ray job submit` runs) and the CLI,
in fresh processes that start their own local Ray, on configs/debug.yaml; and `sfumato <stage>`
as the pipeline's very stage (the same files, the same refusals), on the shared trained run."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO


def _run(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_data_only_pipeline_job_then_dataloader(tmp_path):
    out = tmp_path / "data"
    done = _run(
        "jobs/pipeline.py", "--config", "configs/debug.yaml", f"data.output_dir={out}", "train=null", "tune=null"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingest: 64 inputs -> 64 in manifest, 0 rejected" in done.stdout
    assert "train: off (the config has no train section)" in done.stdout
    # Again with a shards key changed: ingest is complete for this config, shards is not.
    again = _run(
        "jobs/pipeline.py",
        "--config",
        "configs/debug.yaml",
        f"data.output_dir={out}",
        "train=null",
        "tune=null",
        "data.shards.samples_per_shard=16",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in json.loads((out / "pipeline_summary.json").read_text())["stages"]}
    assert stages["ingest"] == "skipped" and stages["shards"] == "ran", stages
    # Ingest forced to run again on the same inputs writes the same files (a row keeps the date it
    # was first collected), so the stages after it stay skipped.
    (out / "pipeline" / "ingest.json").unlink()
    third = _run(
        "jobs/pipeline.py",
        "--config",
        "configs/debug.yaml",
        f"data.output_dir={out}",
        "train=null",
        "tune=null",
        "data.shards.samples_per_shard=16",
    )
    assert third.returncode == 0, third.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in json.loads((out / "pipeline_summary.json").read_text())["stages"]}
    assert stages["ingest"] == "ran" and stages["shards"] == "skipped", stages
    for path in (
        "manifest.parquet",
        "rejects.parquet",
        "ingest.config.yaml",
        "shards/shard_manifest.csv",
        "shards/16/shard-000000.tar",
        "shards/32/shard-000001.tar",
        "shards/shards.config.yaml",
    ):
        assert (out / path).exists(), path
    smoke = _run("-m", "sfumato.cli", "dataloader", "--config", "configs/debug.yaml", f"data.output_dir={out}")
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    result = json.loads(smoke.stdout[smoke.stdout.index("{") :])["dataloader"]
    assert result["batches"] == 4 and result["samples"] == 64 and result["samples_per_s"] > 0


def test_bad_override_exits_2_naming_the_key():
    done = _run("-m", "sfumato.cli", "ingest", "--config", "configs/debug.yaml", "data.shards.samples_per_shard=0")
    assert done.returncode == 2
    assert "data.shards.samples_per_shard" in done.stderr


def test_config_show_prints_the_resolved_tree():
    done = _run("-m", "sfumato.cli", "config", "show", "--config", "configs/pilot.yaml", "seed=9")
    assert done.returncode == 0 and "seed: 9" in done.stdout and "output_dir: /" in done.stdout


# What an evaluation writes into the run folder (the copies start without them).
EVALUATION_OUTPUTS = ("evaluation", "report.md", "model_card.md", "model_card.json", "export")


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "settings",
    [
        # The class yardstick (the run's data has classes; its classifier, cached in the shared data
        # folder, is the other evaluation tests'): samples, metrics, report and cards.
        ["evaluate.num_samples=8", "evaluate.steps=2"],
        # Nothing to measure with: the stage writes the report and cards (where the command, calling
        # run_evaluate itself, used to raise a ValueError).
        ["evaluate.domain.enabled=false"],
    ],
    ids=["yardstick", "documents-only"],
)
def test_evaluate_command_writes_what_the_pipelines_evaluate_stage_writes(straight, tmp_path, capsys, settings):
    pytest.importorskip("deepspeed")
    from sfumato.cli import main
    from sfumato.config import load_run_config, write_resolved
    from sfumato.layout import RunFolder
    from sfumato.stages import REGISTRY

    runs = {}
    for way in ("command", "pipeline"):
        run = shutil.copytree(
            straight.train.output_dir,
            tmp_path / way,
            ignore=lambda folder, names: [n for n in names if n in EVALUATION_OUTPUTS],
        )
        # The run's config.yaml, as the pipeline leaves it, with this case's evaluate settings.
        write_resolved(load_run_config(run, [f"train.output_dir={run}", *settings]), RunFolder(run).config)
        runs[way] = run
    assert main(["evaluate", str(runs["command"])]) == 0
    out = capsys.readouterr().out  # progress lines, then the stage's values as JSON
    printed = json.loads(out[out.index("{\n") :])["evaluate"]
    stage = REGISTRY["evaluate"].run(load_run_config(runs["pipeline"]))  # what run_pipeline calls
    assert printed.keys() == stage.values.keys()

    command, pipeline = _files(runs["command"]), _files(runs["pipeline"])
    assert command.keys() == pipeline.keys()
    written = {name for name in command if name.split("/")[0] in EVALUATION_OUTPUTS}
    assert {"report.md", "model_card.md"} <= written
    if "evaluate.domain.enabled=false" not in settings:
        assert any(name.startswith("evaluation/samples-") for name in written)
    # The same figures and words too, but for the folder's own name and the minute of writing.
    for name in ("report.md", "model_card.md"):
        text = {
            way: re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "DATE", files[name].decode().replace(str(runs[way]), "RUN"))
            for way, files in (("command", command), ("pipeline", pipeline))
        }
        assert text["command"] == text["pipeline"], name


def test_finetune_command_refuses_an_empty_selection_before_any_work(straight, tmp_path, capsys):
    """The stage's refusal (a ConfigError), one line and exit 2, as the pipeline's finetune stage."""
    pytest.importorskip("deepspeed")
    from sfumato.cli import main

    config = tmp_path / "finetune.yaml"
    shutil.copy(straight.train.output_dir / "config.yaml", config)
    code = main(
        [
            "finetune",
            "--config",
            str(config),
            "--from",
            str(straight.train.output_dir),
            f"finetune={{select: {{caption_contains: no such words}}, "
            f"overrides: {{train.output_dir: {tmp_path / 'tuned'}}}}}",
        ]
    )
    assert code == 2 and "finetune.select.caption_contains leaves no row" in capsys.readouterr().err
    assert not (tmp_path / "tuned").exists()


def test_finetune_command_writes_its_report_and_export_as_the_pipelines_stage(straight, tmp_path, capsys):
    """`sfumato finetune` is the pipeline's finetune stage: trained, then its report, cards and
    export (the command used to stop after training)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    from sfumato.cli import main

    config, tuned = tmp_path / "finetune.yaml", tmp_path / "tuned"
    shutil.copy(straight.train.output_dir / "config.yaml", config)
    code = main(
        [
            "finetune",
            "--config",
            str(config),
            "--from",
            str(straight.train.output_dir),
            "export.onnx=false",
            f"finetune={{select: {{tags: [bird, cat]}}, lora: {{rank: 4, alpha: 4}}, overrides: "
            f"{{train.output_dir: {tuned}, train.checkpoint_every_steps: 2, train.sample_every_steps: 2, "
            "train.stages: [{resolution_px: 32, steps: 2, micro_batch_size: 4}]}}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n") :])["finetune"]
    assert printed["run_dir"] == str(tuned) and printed["step"] == 2 and printed["selected_rows"] > 0
    assert (tuned / "report.md").exists() and (tuned / "model_card.md").exists()
    assert (tuned / "export" / "diffusers" / "model_index.json").exists() and (tuned / "export" / "lora").is_dir()

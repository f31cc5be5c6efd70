"""The entry points a user types: `jobs/pipeline.py` (what `ray job submit` runs) and the CLI,
in fresh processes that start their own local Ray, on configs/debug.yaml."""

import json
import os
import subprocess
import sys

from helpers import REPO


def _run(*args, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_data_only_pipeline_job_then_dataloader(tmp_path):
    out = tmp_path / "data"
    done = _run("jobs/pipeline.py", "--config", "configs/debug.yaml", f"data.output_dir={out}", "train=null", "tune=null")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingest: 64 inputs -> 64 in manifest, 0 rejected" in done.stdout
    assert "train: off (the config has no train section)" in done.stdout
    # Again with a shards key changed: ingest is complete for this config, shards is not.
    again = _run("jobs/pipeline.py", "--config", "configs/debug.yaml", f"data.output_dir={out}", "train=null",
                 "tune=null", "data.shards.samples_per_shard=16")
    assert again.returncode == 0, again.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in json.loads((out / "pipeline_summary.json").read_text())["stages"]}
    assert stages["ingest"] == "skipped" and stages["shards"] == "ran", stages
    # Ingest forced to run again on the same inputs writes the same files (a row keeps the date it
    # was first collected), so the stages after it stay skipped.
    (out / "pipeline" / "ingest.json").unlink()
    third = _run("jobs/pipeline.py", "--config", "configs/debug.yaml", f"data.output_dir={out}", "train=null",
                 "tune=null", "data.shards.samples_per_shard=16")
    assert third.returncode == 0, third.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in json.loads((out / "pipeline_summary.json").read_text())["stages"]}
    assert stages["ingest"] == "ran" and stages["shards"] == "skipped", stages
    for path in ("manifest.parquet", "rejects.parquet", "ingest.config.yaml", "shards/shard_manifest.csv",
                 "shards/16/shard-000000.tar", "shards/32/shard-000001.tar", "shards/shards.config.yaml"):
        assert (out / path).exists(), path
    smoke = _run("-m", "sfumato.cli", "dataloader", "--config", "configs/debug.yaml", f"data.output_dir={out}")
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    result = json.loads(smoke.stdout[smoke.stdout.index("{"):])["dataloader"]
    assert result["batches"] == 4 and result["samples"] == 64 and result["samples_per_s"] > 0


def test_bad_override_exits_2_naming_the_key():
    done = _run("-m", "sfumato.cli", "ingest", "--config", "configs/debug.yaml", "data.shards.samples_per_shard=0")
    assert done.returncode == 2
    assert "data.shards.samples_per_shard" in done.stderr


def test_config_show_prints_the_resolved_tree():
    done = _run("-m", "sfumato.cli", "config", "show", "--config", "configs/pilot.yaml", "seed=9")
    assert done.returncode == 0 and "seed: 9" in done.stdout and "output_dir: /" in done.stdout

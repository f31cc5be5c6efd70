"""`pipeline.tune: true`: the sweep runs between the shards and the full run, and the full run
trains the sweep's best config; a second run of the same command skips every stage.

Slow (about 3 minutes here): the default suite covers the pipeline on a two-node cluster
(test_cluster.py) and the sweep itself (test_tune.py)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("deepspeed")
pytest.importorskip("optuna")

from helpers import REPO  # noqa: E402

pytestmark = pytest.mark.slow


def _pipeline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable,
        "-m",
        "sfumato.cli",
        "pipeline",
        "--config",
        "configs/debug.yaml",
        f"data.output_dir={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'train'}",
        f"tune.output_dir={tmp_path / 'tune'}",
        "pipeline.tune=true",
        "tune.search.num_trials=2",
        "tune.search.random_trials=2",
        "tune.search.max_concurrent_trials=1",
        "export.onnx=false",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return {
        s["stage"]: s["status"]
        for s in json.loads((tmp_path / "train" / "pipeline_summary.json").read_text())["stages"]
    }


def test_the_full_run_trains_the_sweeps_best_config(tmp_path):
    assert _pipeline(tmp_path)["tune"] == "ran"
    best = yaml.safe_load((tmp_path / "tune" / "best_config.yaml").read_text())
    trained = yaml.safe_load((tmp_path / "train" / "config.yaml").read_text())
    assert trained["train"]["optimizer"] == best["train"]["optimizer"]
    assert trained["train"]["optimizer"]["lr"] != 0.001  # the sweep's value, not configs/debug.yaml's
    assert trained["train"]["stages"] == best["train"]["stages"]  # the full run's, not the proxy's
    assert (tmp_path / "train" / "checkpoints" / "step-00000010" / "ema.safetensors").exists()
    assert set(_pipeline(tmp_path).values()) == {"skipped", "off"}

"""A Ray Tune sweep of configs/debug.yaml on real CIFAR-10 shards, killed and resumed.

`sfumato tune` runs as a user runs it (its own process, its own local Ray). It is killed with
SIGKILL as soon as its first trial has finished, then resumed with --resume: the finished trial
is not trained again, the sweep completes with ASHA having stopped some trials early, and its
best config is a full run config that trains.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("deepspeed")
pytest.importorskip("optuna")

# About 4.5 minutes on 2 cores: the slow tier (`.ci/run` runs it after the README's command).
pytestmark = pytest.mark.slow

from helpers import REPO  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.config import load_config  # noqa: E402

PROXY_STEPS = 12  # configs/debug.yaml tune.proxy


def _command(cifar_shards, sweep_dir, *extra):
    sources = [{"kind": "folder", "name": "cifar", "path": "/", "license": "research-only"}]
    # One trial at a time: ASHA's decisions then depend on the seeded searcher and the
    # deterministic training only, not on which of two trials reaches a rung first.
    return [
        sys.executable,
        "-m",
        "sfumato.cli",
        "tune",
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        f"data.output_dir={cifar_shards / 'data'}",
        f"data.sources={yaml.safe_dump(sources, default_flow_style=True).strip()}",
        f"tune.output_dir={sweep_dir}",
        "tune.search.num_trials=4",
        "tune.search.max_concurrent_trials=1",
        *extra,
    ]


def _finished(trials_dir):
    done = []
    for trial in trials_dir.glob("*"):
        latest = ckpt.latest(trial / "checkpoints")
        if latest is not None and json.loads((latest / "meta.json").read_text())["step"] == PROXY_STEPS:
            done.append(trial)
    return done


def _start(command, log_path):
    """The command in its own process group (it starts its own local Ray), output to a file."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    with log_path.open("w") as log:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill(process) -> None:
    """SIGKILL the process group: the sweep, its Ray and its trials, without warning."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def sweep(cifar_shards, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "tune"
    logs = sweep_dir.parent
    first = _start(_command(cifar_shards, sweep_dir), logs / "first.log")
    try:
        deadline = time.monotonic() + 600
        while not _finished(sweep_dir / "trials"):
            assert first.poll() is None, f"the sweep ended before any trial finished: {logs / 'first.log'}"
            assert time.monotonic() < deadline, "no trial finished in 10 minutes"
            time.sleep(0.5)
    finally:
        _kill(first)
    finished_before = {
        t.name: ((t / "attempts.jsonl").read_text(), (t / "metrics.jsonl").read_text())
        for t in _finished(sweep_dir / "trials")
    }
    resumed = _start(_command(cifar_shards, sweep_dir, "--resume"), logs / "resumed.log")
    try:
        returncode = resumed.wait(timeout=900)
    finally:
        _kill(resumed)  # its Ray's processes too, even after a clean exit
    assert returncode == 0, (logs / "resumed.log").read_text()[-4000:]
    return sweep_dir, finished_before


def test_resumed_sweep_keeps_finished_trials_and_stops_some_early(sweep):
    sweep_dir, finished_before = sweep
    assert finished_before, "the kill came after a trial had finished"
    with (sweep_dir / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["trial"] for r in rows} == {p.name for p in (sweep_dir / "trials").iterdir()}
    assert len(finished_before) < len(rows), "the kill left trials to resume"
    for trial_id, (attempts, metrics) in finished_before.items():
        trial = sweep_dir / "trials" / trial_id
        assert (trial / "attempts.jsonl").read_text() == attempts, f"finished trial {trial_id} was trained again"
        assert (trial / "metrics.jsonl").read_text() == metrics
    # Each trial trained its own sample of the search space, as a proxy of the debug run.
    for row in rows:
        trial = load_config(sweep_dir / "trials" / row["trial"] / "config.yaml", inputs=False)
        assert trial.train.optimizer.lr == pytest.approx(float(row["train.optimizer.lr"]))
        assert trial.train.grad_accum_steps == int(row["train.grad_accum_steps"])
        assert trial.train.num_workers == 1 and trial.train.stages[0].steps == PROXY_STEPS
    assert len({row["train.optimizer.lr"] for row in rows}) == len(rows), "every trial drew its own lr"
    statuses = {r["trial"]: r["status"] for r in rows}
    assert all(statuses[t] == "completed" for t in finished_before)
    early = [r for r in rows if r["status"] == "stopped early"]
    assert early, f"ASHA stopped no trial: {statuses}"
    assert all(int(r["steps"]) < PROXY_STEPS for r in early)
    assert sum(int(r["steps"]) for r in rows) < len(rows) * PROXY_STEPS
    # Every trial reported validation losses at the configured interval.
    for row in rows:
        assert row["final_val_loss"] and math.isfinite(float(row["final_val_loss"]))
    assert (sweep_dir / "learning_curves.png").stat().st_size > 0
    assert "stopped early" in (sweep_dir / "results.md").read_text()


def test_best_config_is_the_full_run_with_scaled_lr_and_trains(sweep, tmp_path, ray_local):
    from sfumato.train.loop import run_training

    sweep_dir, _ = sweep
    best = json.loads((sweep_dir / "best.json").read_text())
    with (sweep_dir / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    completed = [r for r in rows if r["status"] == "completed"]
    assert best["trial_id"] == min(completed, key=lambda r: float(r["final_val_loss"]))["trial"]
    full = load_config(sweep_dir / "best_config.yaml")
    debug = load_config(REPO / "configs" / "debug.yaml")
    # Proxy-only keys are the full run's again.
    assert full.tune is None
    assert full.train.stages == debug.train.stages and full.train.num_workers == 2
    assert full.train.data_fraction == 1.0 and full.train.validation is None
    # Tuned keys carry over; the learning rate moves by the square-root rule.
    proxy_values = best["proxy_values"]
    assert full.train.grad_accum_steps == proxy_values["train.grad_accum_steps"]
    assert full.diffusion.min_snr_gamma == proxy_values["diffusion.min_snr_gamma"]
    full_batch = (
        sum(s.micro_batch_size * s.steps for s in debug.train.stages)
        / debug.train.total_steps
        * full.train.grad_accum_steps
        * full.train.num_workers
    )
    proxy_batch = 8 * proxy_values["train.grad_accum_steps"]  # proxy: micro batch 8, one worker
    assert best["effective_batch_full"] == pytest.approx(full_batch)
    assert full.train.optimizer.lr == pytest.approx(
        proxy_values["train.optimizer.lr"] * math.sqrt(full_batch / proxy_batch)
    )
    # It trains as it is (a shorter curriculum, to keep the test short).
    short = load_config(
        sweep_dir / "best_config.yaml",
        [f"train.output_dir={tmp_path / 'best'}", "train.stages.0.steps=2", "train.stages.1.steps=1"],
    )
    assert run_training(short)["step"] == 3

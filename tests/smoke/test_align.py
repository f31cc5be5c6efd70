"""`sfumato align`: Diffusion-DPO on Ray Train + DeepSpeed from a trained run, on pairs made from
A/B votes (a collection round on the run's own export, judged by a script), with the reference
frozen, the held-out reward accuracy and policy distance logged, lineage recorded, and an exact
resume after a killed worker."""

from __future__ import annotations

import hashlib

import pytest
import torch

from helpers import exported
from sfumato import checkpoint as ckpt
from sfumato.abtest.app import ABTest, conditions_for, load_arm
from sfumato.config import apply, run_tree, validated
from sfumato.data.pairs import run_pairs
from sfumato.layout import RunFolder, read_metrics
from sfumato.testing.judge import judge
from sfumato.train.align import run_config
from sfumato.train.faults import KillWorkerAt
from sfumato.train.loop import run_training


@pytest.fixture(scope="module")
def pairs(straight, tmp_path_factory):
    """Pairs from 40 judged trials of the straight run's export against itself."""
    import io

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("align") / "collect"
    arm = load_arm(f"base={exported(straight)}")
    test = ABTest(folder, [arm, arm], conditions_for([arm], None), steps=4, seed=3)
    for _ in range(40):
        trial = test.new_trial()
        left, right = (np.asarray(Image.open(io.BytesIO(trial.images[s])).convert("RGB")) for s in ("left", "right"))
        test.vote(trial.id, judge(left, right), "judge")
    out = folder.parent / "pairs.parquet"
    summary = run_pairs([folder], out)
    assert summary["pairs"] + summary["ties"] == 40
    return out


def _align_cfg(straight, pairs, name: str, *overrides: str):
    tree = run_tree(straight)
    tree["align"] = {
        "pairs": str(pairs),
        "beta": 1000.0,
        "holdout_fraction": 0.25,
        "overrides": {
            "train.output_dir": str(straight.train.output_dir.parent / name),
            "train.stages": [{"resolution_px": 32, "steps": 6, "micro_batch_size": 4}],
            "train.optimizer.lr": 1e-4,
            "train.checkpoint_every_steps": 3,
            "train.sample_every_steps": 3,
            "train.log_every_steps": 1,
        },
    }
    tree = apply(tree, dict(o.split("=", 1) for o in overrides))
    return run_config(validated(tree, "test"), parent=straight.train.output_dir)


def _digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def aligned(straight, pairs):
    parent_checkpoints = _digest(straight.train.output_dir / "checkpoints")
    cfg = _align_cfg(straight, pairs, "aligned")
    run_training(cfg)
    assert _digest(straight.train.output_dir / "checkpoints") == parent_checkpoints  # the parent is untouched
    return cfg


def test_an_alignment_logs_dpo_and_held_out_reward_figures_and_records_its_pairs(aligned, pairs):
    run = RunFolder(aligned.train.output_dir)
    metrics = [m for m in read_metrics(run.metrics) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(0.0 <= m["reward_accuracy"] <= 1.0 for m in metrics)
    assert abs(metrics[0]["loss"] - 0.6931) < 0.05  # at the reference: log 2 (one update in: nearly)
    held = [m for m in read_metrics(run.metrics) if "heldout_reward_accuracy" in m]
    assert [m["step"] for m in held] == [3, 6]
    assert all(m["policy_distance"] > 0 for m in held) and held[1]["policy_distance"] > held[0]["policy_distance"]
    lineage = aligned.train.lineage
    assert lineage.pairs == pairs and lineage.pairs_sha256 == hashlib.sha256(pairs.read_bytes()).hexdigest()
    assert aligned.train.dpo.beta == 1000.0 and "align" not in run.config.read_text().split("train:")[0]


def test_the_aligned_run_exports_and_differs_from_its_parent(aligned, straight):
    from sfumato.export.export_run import run_export
    from sfumato.models.run import load_trained

    run_export(aligned.train.output_dir)
    _, policy, _ = load_trained(aligned.train.output_dir)
    _, parent, _ = load_trained(straight.train.output_dir)
    moved = [not torch.equal(a, b) for a, b in zip(policy.denoiser.parameters(), parent.denoiser.parameters())]
    assert any(moved)


def test_pairs_with_a_condition_the_model_lacks_are_refused_before_any_work(straight, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"id": ["x"], "condition": ["unicorn"], "chosen": [b"1"], "rejected": [b"2"], "origin": ["o"]}), bad
    )
    with pytest.raises(ValueError, match="row 0: condition 'unicorn' is not one of the model's classes"):
        _align_cfg(straight, bad, "refused")
    assert not (straight.train.output_dir.parent / "refused").exists()


@pytest.mark.slow
def test_a_killed_alignment_resumes_to_the_uninterrupted_weights(aligned, straight, pairs):
    killed = _align_cfg(straight, pairs, "aligned-killed")
    run_training(killed, hooks=[KillWorkerAt(4)])  # after the step-3 checkpoint
    assert (killed.train.output_dir / ".injected").read_text() == "4"
    a = ckpt.load_ema(ckpt.latest(aligned.train.output_dir / "checkpoints"))
    b = ckpt.load_ema(ckpt.latest(killed.train.output_dir / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

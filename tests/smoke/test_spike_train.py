"""The loss-spike guard on local Ray (2 workers, DeepSpeed ZeRO-2 on gloo, configs/debug.yaml):
an injected spike rolls the run back once and it ends with finite weights at the lowered learning
rate; a spike that recurs past train.spike_guard.max_rollbacks stops it with a clear error.

About a minute each on two cores: the slow tier."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from helpers import run_config  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.layout import RunFolder, metric_events, read_jsonl, read_metrics  # noqa: E402
from sfumato.train.faults import SpikeLossAt  # noqa: E402
from sfumato.train.loop import run_training  # noqa: E402
from sfumato.train.spike import LossSpikeError  # noqa: E402

pytestmark = pytest.mark.slow

# Logged every 2 steps, checkpoints at 5 and 10; the spike covers steps 6-8 (across the 16 -> 32 px
# stage change), so the guard sees it at logged steps 6 and 8 and goes back to step 5.
GUARD = (
    "train.spike_guard.armed_after_steps=2",
    "train.spike_guard.patience_logged_steps=2",
    "train.spike_guard.max_rollbacks=1",
    "train.spike_guard.lr_scale=0.5",
)


def test_a_spike_rolls_the_run_back_once_and_it_ends_finite_at_a_lower_lr(cifar_shards):
    cfg = run_config(cifar_shards, "spike", *GUARD)
    run_training(cfg, hooks=[SpikeLossAt(6, length=3, times=1)])
    run = RunFolder(cfg.train.output_dir)
    (rollback,) = metric_events(run.metrics, "rollback")
    assert (rollback["spike_step"], rollback["first_spike_step"], rollback["step"]) == (8, 6, 5)
    assert rollback["loss"] > 3 * rollback["loss_average"] and rollback["lr_scale"] == 0.5
    attempts = read_jsonl(run.attempts)
    assert [(a.get("event"), a["resumed_from"]) for a in attempts] == [(None, None), ("rollback", "step-00000005")]
    metrics = read_metrics(run.metrics)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10], "the steps after the rollback are logged once"
    assert [m["lr"] for m in metrics] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4], "lr x 0.5 from the rollback on"
    assert max(m["loss"] for m in metrics) < 3 * rollback["loss_average"], "the replayed steps trained clean"
    final = ckpt.latest(run.checkpoints)
    assert final.name == "step-00000010" and not run.stopped.exists()
    assert ckpt.load_meta(final)["spike_guard"] == {"rollbacks": 1, "lr_scale": 0.5}, "a restart keeps them"
    weights = torch.load(final / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(w).all() for w in [*weights.values(), *ckpt.load_ema(final).values()])

    from sfumato.evaluate.report import write_report

    report = write_report(run.root).read_text()
    assert "## Rollbacks (loss spikes)" in report and "| 1 | 8 | 6 |" in report
    assert "2 start(s)" not in report, "a rollback is not counted as a restart"


def test_a_spike_past_max_rollbacks_stops_every_rank_with_a_clear_error(cifar_shards):
    cfg = run_config(cifar_shards, "spike-twice", *GUARD)
    with pytest.raises(
        LossSpikeError,
        match=r"loss .* above 3 x its running average .* for 2 logged steps at step 8; "
        r"train\.spike_guard\.max_rollbacks=1 reached",
    ):
        run_training(cfg, hooks=[SpikeLossAt(6, length=3, times=2)])
    run = RunFolder(cfg.train.output_dir)
    stopped = json.loads(run.stopped.read_text())
    assert stopped["step"] == 8 and stopped["kind"] == "loss_spike"
    assert len(metric_events(run.metrics, "rollback")) == 1
    assert [a.get("event") for a in read_jsonl(run.attempts)] == [None, "rollback"], "a spike stop is not retried"
    assert ckpt.latest(run.checkpoints).name == "step-00000005", "nothing of the spike was committed"

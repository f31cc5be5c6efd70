"""What the trainer reports, without Ray: the loss average is an unbiased running mean from the
first step, the ETA of a run is its true remaining time when every image-pixel costs the same,
and the console line a person reads holds step, bar, rate, elapsed time and ETA."""

import math
from types import SimpleNamespace

import pytest

from sfumato.console import duration, progress_text
from sfumato.records import MetricsLine
from sfumato.train.progress import LossAverage, Progress, progress_line, remaining_work


def _debug_curriculum():
    """configs/debug.yaml's train section as far as progress reads it (a TrainConfig would
    import torch through the model registry): 6 steps at 16 px, micro batch 8, then 4 at 32 px,
    micro batch 4, 2 workers."""
    stages = [
        SimpleNamespace(resolution_px=16, steps=6, micro_batch_size=8),
        SimpleNamespace(resolution_px=32, steps=4, micro_batch_size=4),
    ]
    return SimpleNamespace(stages=stages, effective_batch=lambda stage: stage.micro_batch_size * 2)


def test_loss_average_is_the_mean_of_a_constant_series_from_the_first_step():
    average = LossAverage()
    assert average.value is None
    assert [average.update(0.25) for _ in range(5)] == pytest.approx([0.25] * 5, rel=1e-12)
    # A plain EMA started at 0 would read 0.005 after one step of 0.25, one started at the first
    # loss leans on it: the corrected one weighs the first two losses (almost) equally.
    two = LossAverage()
    two.update(1.0)
    assert two.update(3.0) == pytest.approx((0.98 * 1.0 + 3.0) / 1.98)


def test_loss_average_tracks_a_step_change_with_its_half_life():
    average = LossAverage()
    for _ in range(200):
        average.update(1.0)
    half_life_steps = math.log(0.5) / math.log(0.98)  # 34.3 steps
    values = [average.update(3.0) for _ in range(400)]
    assert all(a < b for a, b in zip(values, values[1:])), "moves monotonically towards the new level"
    assert values[round(half_life_steps) - 1] == pytest.approx(2.0, abs=0.05), "half way after one half-life"
    assert values[-1] == pytest.approx(3.0, abs=1e-3)


def test_loss_average_resumed_from_its_state_continues_the_same_series():
    losses = [0.9, 0.5, 0.7, 0.2, 0.4, 0.3]
    straight = LossAverage()
    for loss in losses:
        straight.update(loss)
    first = LossAverage()
    for loss in losses[:3]:
        first.update(loss)
    resumed = LossAverage.from_state(first.state_dict())
    for loss in losses[3:]:
        resumed.update(loss)
    assert resumed.value == straight.value
    assert LossAverage.from_state(None).value is None, "an older checkpoint without one starts anew"


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_eta_is_the_true_remaining_time_when_every_image_pixel_costs_the_same():
    """A simulated run of the debug curriculum whose steps cost a fixed time per image-pixel: at
    every log step the ETA (measured on the current stage only) is the time it still takes."""
    t = _debug_curriculum()
    seconds_per_image_pixel = 1e-4
    clock, timeline, etas = _Clock(), [], {}
    progress = Progress(t, step=0, clock=clock)
    step = 0
    for stage in t.stages:
        progress.start_stage(stage)
        for _ in range(stage.steps):
            images = t.effective_batch(stage)
            clock.now += images * stage.resolution_px**2 * seconds_per_image_pixel
            progress.add_samples(images)
            step += 1
            timeline.append(clock.now)
            etas[step] = progress.measure(step)
    end = timeline[-1]
    for step, record in etas.items():
        assert record["eta_s"] == pytest.approx(end - timeline[step - 1]), step
        assert record["elapsed_s"] == pytest.approx(timeline[step - 1] - 100.0)
    assert etas[10]["eta_s"] == 0 and remaining_work(t, 10) == 0
    assert etas[3]["samples_per_s"] == pytest.approx(1 / (16**2 * seconds_per_image_pixel))


def test_progress_line_reads_step_bar_loss_rate_elapsed_and_eta():
    record = {
        "step": 40,
        "resolution_px": 16,
        "loss": 0.1234,
        "loss_ema": 0.13,
        "lr": 1e-3,
        "samples_per_s": 41.26,
        "elapsed_s": 25.0,
        "eta_s": 331.0,
    }
    line = progress_line(MetricsLine.from_json(record), 600)
    assert line == (
        "step  40/600 [#...................]   7% | 16px | loss 0.1234 (ema 0.1300) | lr 1.00e-03 | "
        "41.3 samples/s | 0:25 elapsed | ETA 5:31"
    )
    assert (
        progress_line(MetricsLine.from_json({"step": 600, "val_loss": 0.5}), 600)
        == "step 600/600 [####################] 100% | val_loss 0.5000"
    )
    # The quality watched during training (train.quality) joins the line when it was measured.
    watched = {"step": 600, "watch_class_accuracy": 0.9375, "watch_fd_domain": 2.345, "watch_samples": 64, "watch_s": 3}
    assert progress_line(MetricsLine.from_json(watched), 600).endswith(
        "| class accuracy 0.938, FD-domain 2.35 (64 samples)"
    )
    assert duration(3723.4) == "1:02:03" and duration(59.6) == "1:00"
    assert (
        progress_text(32, 128, 4.0, "images")
        == "32/128 images [#####...............]  25% | 8.0 images/s | 0:04 elapsed | ETA 0:12"
    )

"""What the trainer reports per log step, apart from the model: a bias-corrected running mean of
the loss, the throughput, the elapsed time and a stage-aware ETA, and the one console line
that shows them.

Nothing here knows about Ray or torch; the worker loop feeds it numbers and a clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sfumato.console import bar, duration
from sfumato.records import VAL_LOSS, MetricsLine, QualityWatchRecord, TrainStepRecord, ValidationRecord


@dataclass
class LossAverage:
    """Exponential moving average of the loss with Adam's bias correction (Kingma & Ba 2015,
    Algorithm 1): m_n = beta * m_{n-1} + (1 - beta) * loss_n from m_0 = 0, reported as
    m_n / (1 - beta^n). A plain EMA started at 0 reads far too low for its first ~1/(1-beta)
    steps, one started at the first loss leans on that single value; the corrected one is the
    beta-weighted mean of the losses seen so far from the first step."""

    beta: float = 0.98
    biased_mean: float = 0.0  # m_n
    updates: int = 0  # n

    def add(self, loss) -> None:
        """A float, or a 0-dim tensor kept where it is: the mean then stays on the device and
        is read back only when `value` or `state_dict` is asked for (when logging)."""
        self.updates += 1
        self.biased_mean = self.beta * self.biased_mean + (1 - self.beta) * loss

    def update(self, loss: float) -> float:
        self.add(loss)
        return self.value

    @property
    def value(self) -> float | None:
        return None if self.updates == 0 else float(self.biased_mean) / (1 - self.beta**self.updates)

    def state_dict(self) -> dict:
        return {"biased_mean": float(self.biased_mean), "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict | None, beta: float = 0.98) -> LossAverage:
        """From a checkpoint's meta; a checkpoint without one (older runs) starts the average anew."""
        return cls(beta) if not state else cls(beta, float(state["biased_mean"]), int(state["updates"]))


def remaining_work(train_cfg, step: int) -> float:
    """What is left of the run after `step` optimizer steps, in images x pixels per image."""
    work, start = 0.0, 0
    for stage in train_cfg.stages:
        left = min(stage.steps, max(0, start + stage.steps - step))
        work += left * train_cfg.effective_batch(stage) * stage.resolution_px**2
        start += stage.steps
    return work


class Progress:
    """Throughput, elapsed time and ETA of one start of the worker group (rank 0 prints them).

    The ETA is the run's remaining work (images x pixels, `remaining_work`) at the current stage's
    rate so far, which includes its grids, validation and checkpoints. A later stage is assumed
    to cost the same per image-pixel until its own rate is measured, once it starts."""

    def __init__(self, train_cfg, step: int, clock=time.perf_counter):
        self.train_cfg, self.clock = train_cfg, clock
        self.started = clock()
        self.window_start, self.window_samples, self.window_step = self.started, 0, step
        self.stage_start, self.stage_samples, self.resolution_px = self.started, 0, None

    def start_stage(self, stage) -> None:
        self.stage_start, self.stage_samples, self.resolution_px = self.clock(), 0, stage.resolution_px

    def add_samples(self, count: int) -> None:
        """Images of one micro-batch on all ranks."""
        self.window_samples += count
        self.stage_samples += count

    def measure(self, step: int) -> dict:
        """The log step's timing fields; starts the next throughput window."""
        now = self.clock()
        seconds = now - self.window_start
        steps = max(1, step - self.window_step)
        stage_rate = self.stage_samples * self.resolution_px**2 / max(now - self.stage_start, 1e-9)
        record = {
            "samples_per_s": self.window_samples / max(seconds, 1e-9),
            "step_time_s": seconds / steps,
            "elapsed_s": now - self.started,
            "eta_s": remaining_work(self.train_cfg, step) / stage_rate if stage_rate > 0 else None,
        }
        self.window_start, self.window_samples, self.window_step = now, 0, step
        return record


def progress_line(line: MetricsLine, total_steps: int) -> str:
    """step  40/600 [#...]   7% | 16px | loss 0.1234 (ema 0.1300) | lr 1.00e-03 | 41.3 samples/s |
    0:25 elapsed | ETA 5:31 (and val_loss, and the watched class accuracy and FD-domain, when the
    line has them)."""
    parts = [f"step {line.step:>{len(str(total_steps))}}/{total_steps} {bar(line.step / total_steps)}"]
    train, validation = line.get(TrainStepRecord), line.get(ValidationRecord)
    if train is not None:
        eta = "?" if train.eta_s is None else duration(train.eta_s)
        parts += [
            f"{train.resolution_px}px",
            f"loss {train.loss:.4f} (ema {train.loss_ema:.4f})",
            f"lr {train.lr:.2e}",
            f"{train.samples_per_s:.1f} samples/s",
            f"{duration(train.elapsed_s)} elapsed",
            f"ETA {eta}",
        ]
    if validation is not None:
        parts.append(f"{VAL_LOSS} {validation.val_loss:.4f}")
    watch = line.get(QualityWatchRecord)
    if watch is not None:
        accuracy = "" if watch.watch_class_accuracy is None else f"class accuracy {watch.watch_class_accuracy:.3f}, "
        parts.append(f"{accuracy}FD-domain {watch.watch_fd_domain:.3g} ({watch.watch_samples} samples)")
    return " | ".join(parts)

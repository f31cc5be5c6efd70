"""Hooks into the worker loop, and the fault injections tests pass in through them.

The loop calls `before_step(worker)` before each optimizer step and `after_step(worker)` after it
(the EMA updated, nothing logged or saved yet). Hooks travel to the Ray workers with the loop's
config, so they are plain picklable objects defined here, in the library the workers import.
"""

from __future__ import annotations

import os


class Hooks:
    """No-op base: override what you need."""

    def before_step(self, worker) -> None:
        pass

    def after_step(self, worker) -> None:
        pass


class KillWorkerAt(Hooks):
    """The last rank's process dies without warning after optimizer step `step`, once per run
    folder (RunFolder.injected_failure marks it): Ray restarts the group, which resumes."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, worker) -> None:
        marker = worker.run.injected_failure
        if worker.state.step == self.step and worker.rank == worker.world - 1 and not marker.exists():
            marker.write_text(str(self.step))
            os._exit(1)


class PoisonWeightsAt(Hooks):
    """Before optimizer step `step` the last rank's first weight turns NaN: only that rank sees a
    non-finite loss, and every rank must stop."""

    def __init__(self, step: int):
        self.step = step

    def before_step(self, worker) -> None:
        import torch

        if worker.state.step == self.step and worker.rank == worker.world - 1:
            with torch.no_grad():
                next(worker.engine.module.parameters()).mul_(float("nan"))


class SpikeLossAt(Hooks):
    """From optimizer step `step` on, for `length` steps, every rank's denoiser output is shifted
    by `offset`: the loss jumps by about offset**2 and stays finite (a forward hook, so the
    spike does not hang on how the engine keeps its weights). `times`: how many of the workers'
    passes through `step` spike (in memory: a rollback replays the step in the same processes,
    so times=1 spikes once and the replay trains clean; a larger `times` spikes again)."""

    def __init__(self, step: int, length: int = 3, offset: float = 10.0, times: int = 1):
        self.step, self.length, self.offset, self.times = step, length, offset, times
        self.fired, self.handle, self.previous = 0, None, None

    def before_step(self, worker) -> None:
        number = worker.state.step + 1  # the optimizer step about to be taken
        went_back = self.previous is not None and number <= self.previous  # a rollback
        self.previous = number
        if self.handle is not None and (went_back or number >= self.step + self.length):
            self.handle.remove()
            self.handle = None
        if number == self.step and self.handle is None and self.fired < self.times:
            self.fired += 1
            self.handle = worker.engine.module.register_forward_hook(lambda module, args, output: output + self.offset)


class TextEncoderMustNotRun(Hooks):
    """Every rank stops the run (a RuntimeError) if the training denoiser's text encoder runs in
    an optimizer step: what a run whose frozen encoder's states come from the cache promises.
    The sample grids run an EMA copy's encoder, outside the steps, and are not counted."""

    def __init__(self):
        self.calls, self.handle = 0, None

    def before_step(self, worker) -> None:
        if self.handle is None:
            self.handle = worker.engine.module.text_encoder.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def after_step(self, worker) -> None:
        if self.calls:
            raise RuntimeError(f"the text encoder ran {self.calls} times in step {worker.state.step}")

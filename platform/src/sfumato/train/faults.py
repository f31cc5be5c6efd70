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

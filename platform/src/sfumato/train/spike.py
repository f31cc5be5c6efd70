"""The loss-spike guard (issue 16): a loss that stays far above its running average rolls the run
back to a checkpoint from before the spike and continues at a lower learning rate, or stops it.

Large runs diverge in spikes that NaN checks never see: the loss jumps, stays finite, and the
weights it leaves behind are worse than the ones of a few hundred steps before. PaLM (Chowdhery
et al. 2022, section 5.1) restarted such runs from a checkpoint before the spike; OLMo and
Megatron watch the loss against its recent average. This is that rule, on the logged steps:

    spiking(step) = loss(step) > factor x baseline,  baseline = the running average at the
                    last logged step that was not spiking (so a lasting spike cannot raise
                    its own yardstick and hide)

`patience_logged_steps` spiking logged steps in a row make a `Spike`. The worker feeds
`observe` the mean over all ranks of the loss and of the average, so every rank decides the
same and they roll back (collective loads) or stop together. Nothing here knows about Ray,
DeepSpeed or the run folder; sfumato.train.worker (watch_loss) and checkpointing (roll_back) act on
the decision.
"""

from __future__ import annotations

from dataclasses import dataclass


class LossSpikeError(RuntimeError):
    """A lasting loss spike with no rollback left (or `action: stop`): the run stops, not retried."""


@dataclass(frozen=True)
class Spike:
    """A confirmed spike: `logged_steps` spiking logged steps in a row, the first at `first_step`."""

    step: int
    first_step: int
    loss: float
    average: float
    factor: float
    logged_steps: int

    def describe(self) -> str:
        return (
            f"loss {self.loss:.4g} above {self.factor:g} x its running average {self.average:.4g} "
            f"for {self.logged_steps} logged steps at step {self.step}"
        )


class RollBack(Exception):
    """Raised on every rank alike from the step that confirmed `spike`; the worker's loop catches
    it, reloads a checkpoint from before `spike.first_step` and goes on (not an error)."""

    def __init__(self, spike: Spike):
        super().__init__(spike.describe())
        self.spike = spike


@dataclass
class SpikeGuard:
    """The rule's state on one rank. `rollbacks` and `lr_scale` belong to the run: they are saved
    in every checkpoint's meta, so a restarted run keeps its lowered learning rate and its count.
    The window starts afresh after every load, its baseline the loaded running average (a
    spike that starts right after a rollback is measured against the average from before it)."""

    cfg: object = None  # sfumato.config.SpikeGuardConfig, or None: no guard
    rollbacks: int = 0
    lr_scale: float = 1.0
    """The learning rate's factor: lr_scale ** rollbacks of the config."""
    baseline: float | None = None
    first_step: int | None = None
    consecutive: int = 0

    def observe(self, step: int, loss: float, average: float | None, averaged_steps: int) -> Spike | None:
        """One logged step's loss and running average (over `averaged_steps` optimizer steps):
        the confirmed spike, if this step completes one."""
        if self.cfg is None or average is None:
            return None
        armed = averaged_steps >= self.cfg.armed_after_steps and self.baseline is not None
        if armed and loss > self.cfg.factor * self.baseline:
            self.consecutive += 1
            if self.consecutive == 1:
                self.first_step = step
            if self.consecutive < self.cfg.patience_logged_steps:
                return None
            return Spike(step, self.first_step, loss, self.baseline, self.cfg.factor, self.consecutive)
        self.consecutive, self.first_step, self.baseline = 0, None, average
        return None

    def decide(self, spike: Spike) -> RollBack:
        """The RollBack to raise, or LossSpikeError when the config says stop or no rollback is left."""
        if self.cfg.action == "stop":
            raise LossSpikeError(f"{spike.describe()}; train.spike_guard.action=stop")
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise LossSpikeError(
                f"{spike.describe()}; train.spike_guard.max_rollbacks={self.cfg.max_rollbacks} "
                "reached (lower train.optimizer.lr, or raise max_rollbacks)"
            )
        return RollBack(spike)

    def rolled_back(self) -> None:
        """Count a rollback and lower the learning rate (after the checkpoint's state is loaded)."""
        self.rollbacks += 1
        self.lr_scale *= self.cfg.lr_scale

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict | None, baseline: float | None = None) -> None:
        """From a checkpoint's meta (none in older checkpoints: no rollback yet) and its running
        average (all ranks' mean; None: the first logged step sets the baseline)."""
        state = state or {}
        self.rollbacks, self.lr_scale = int(state.get("rollbacks", 0)), float(state.get("lr_scale", 1.0))
        self.baseline, self.first_step, self.consecutive = baseline, None, 0


def rollback_target(committed_steps: list[int], first_step: int) -> int | None:
    """The step of the newest committed checkpoint from before the spike began (one written
    between its first spiking logged step and its confirmation would hold spiked weights)."""
    before = [s for s in committed_steps if s < first_step]
    return max(before) if before else None

"""The loss-spike guard's rule without Ray: a lasting spike is caught (and only a lasting one),
its yardstick is the average from before it, the run's rollback count and learning-rate scale
survive a checkpoint, and an injected spike on real images is what the guard sees."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import REPO
from sfumato import checkpoint as ckpt
from sfumato.config import ConfigError, SpikeGuardConfig, load_config
from sfumato.layout import metric_events, read_metrics, truncate_metrics
from sfumato.train.spike import LossSpikeError, RollBack, SpikeGuard, rollback_target

GUARD = SpikeGuardConfig(factor=3.0, patience_logged_steps=2, armed_after_steps=10, max_rollbacks=1)


def _feed(guard: SpikeGuard, losses: list[float], averages: list[float], first_step: int = 10, every: int = 10):
    """Logged steps first_step, first_step + every, ...: the spikes they confirm (step: Spike)."""
    found = {}
    for k, (loss, average) in enumerate(zip(losses, averages)):
        step = first_step + k * every
        spike = guard.observe(step, loss, average, averaged_steps=step)
        if spike is not None:
            found[step] = spike
    return found


def test_noisy_losses_around_their_average_never_trigger():
    rng = np.random.default_rng(0)
    losses = list(0.2 * rng.uniform(0.4, 1.4, size=500))  # the debug runs' per-batch scatter
    assert _feed(SpikeGuard(GUARD), losses, [0.2] * 500) == {}


def test_a_lasting_spike_is_confirmed_after_patience_a_single_one_is_not():
    guard = SpikeGuard(GUARD)
    losses = [0.3, 0.3, 2.0, 0.3, 0.3, 2.0, 2.5, 0.3]
    found = _feed(guard, losses, [0.3] * len(losses))
    assert list(found) == [70], "one spiking logged step is noise; two in a row are a spike"
    spike = found[70]
    assert (spike.first_step, spike.loss, spike.average, spike.logged_steps) == (60, 2.5, 0.3, 2)
    assert spike.describe() == "loss 2.5 above 3 x its running average 0.3 for 2 logged steps at step 70"


def test_the_yardstick_is_the_average_from_before_the_spike():
    """The running average takes the spike in: compared with it, a lasting spike would hide."""
    losses = [0.3, 0.3, 3.0, 3.0, 3.0]
    averages = [0.3, 0.3, 1.2, 1.6, 2.0]  # pulled up by the spiking steps, and 3.0 < 3 x 1.2
    assert list(_feed(SpikeGuard(GUARD), losses, averages))[0] == 40


def test_the_guard_waits_for_its_average_to_warm_up_and_none_disables_it():
    guard = SpikeGuard(GUARD)
    assert guard.observe(2, 0.1, 0.1, averaged_steps=2) is None
    assert guard.observe(4, 5.0, 0.5, averaged_steps=4) is None and guard.consecutive == 0, "not armed yet"
    assert _feed(SpikeGuard(None), [0.1, 9.0, 9.0, 9.0], [0.1] * 4) == {}


def test_rollbacks_until_max_rollbacks_then_a_stop_that_names_the_key():
    guard = SpikeGuard(GUARD)
    spike = _feed(guard, [0.3, 0.3, 2.0, 2.0], [0.3] * 4)[40]
    assert isinstance(guard.decide(spike), RollBack)
    guard.rolled_back()
    assert (guard.rollbacks, guard.lr_scale) == (1, 0.5)
    with pytest.raises(
        LossSpikeError,
        match=r"loss 2 above 3 x its running average 0\.3 for 2 logged steps at "
        r"step 40; train\.spike_guard\.max_rollbacks=1 reached",
    ):
        guard.decide(spike)
    stopping = SpikeGuard(GUARD.model_copy(update={"action": "stop"}))
    with pytest.raises(LossSpikeError, match=r"train\.spike_guard\.action=stop"):
        stopping.decide(spike)


def test_rollbacks_and_lr_scale_survive_a_checkpoint_the_window_does_not():
    guard = SpikeGuard(GUARD)
    guard.rolled_back()
    guard.observe(10, 0.3, 0.3, 10)
    guard.observe(20, 2.0, 0.3, 20)
    restarted = SpikeGuard(GUARD)
    restarted.load_state_dict(guard.state_dict())
    assert (restarted.rollbacks, restarted.lr_scale) == (1, 0.5)
    assert (restarted.baseline, restarted.consecutive) == (None, 0)
    old = SpikeGuard(GUARD)
    old.load_state_dict(None)  # a checkpoint from before the guard
    assert (old.rollbacks, old.lr_scale) == (0, 1.0)
    # A spike from the first logged step after a load is measured against the loaded average.
    rolled_back = SpikeGuard(GUARD)
    rolled_back.load_state_dict(guard.state_dict(), baseline=0.3)
    assert list(_feed(rolled_back, [2.0, 2.0], [1.0, 1.4]))[0] == 20


def test_rollback_goes_to_the_newest_checkpoint_from_before_the_spike_began():
    assert rollback_target([5, 10, 15], first_step=16) == 15
    assert rollback_target([5, 10, 15], first_step=15) == 10, "step 15 was saved while spiking"
    assert rollback_target([5], first_step=4) is None


def test_config_keys_are_checked_at_load_and_null_disables():
    pilot = REPO / "configs" / "pilot.yaml"
    assert load_config(pilot).train.spike_guard == SpikeGuardConfig()
    assert load_config(pilot, ["train.spike_guard=null"]).train.spike_guard is None
    assert load_config(pilot, ["train.spike_guard.max_rollbacks=0"]).train.spike_guard.factor == 3.0
    for override, key in [
        ("train.spike_guard.factor=1.0", "train.spike_guard.factor"),
        ("train.spike_guard.action=skip", "train.spike_guard.action"),
        ("train.spike_guard.lr_scale=0", "train.spike_guard.lr_scale"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(pilot, [override])
        assert f"  {key}" in str(err.value)


def test_rollback_lines_stay_out_of_the_per_step_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 2, "loss": 0.3},
        {"step": 4, "loss": 0.3},
        {"step": 6, "loss": 3.0},
        {"event": "rollback", "step": 4, "spike_step": 6},
    ]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    truncate_metrics(metrics, 4)  # what a later resume from step 4 does: the rollback stays
    assert [m["step"] for m in read_metrics(metrics)] == [2, 4] and read_metrics(metrics)[1]["loss"] == 0.3
    assert [e["spike_step"] for e in metric_events(metrics, "rollback")] == [6]


def test_discarded_checkpoints_are_never_loaded(tmp_path):
    for step in (5, 10, 15):
        (ckpt.partial_dir(tmp_path, step)).mkdir()
        ckpt.commit(tmp_path, step, {}, {"step": step}, num_to_keep=3)
    ckpt.discard_after(tmp_path, 5)
    assert [p.name for p in ckpt.committed(tmp_path)] == ["step-00000005"]


def test_an_injected_spike_on_real_images_is_caught_by_the_guard(cifar_dir):
    """unet-tiny on real CIFAR images with the plain engine; SpikeLossAt shifts the output from
    step 21 for 4 steps. Logged every 2 steps, the guard confirms the spike at step 24, started at
    22, and stays quiet through the falling losses before: the losses stay finite throughout."""
    torch = pytest.importorskip("torch")
    import helpers
    from sfumato.models.registry import build_denoiser
    from sfumato.train.faults import SpikeLossAt
    from sfumato.train.progress import LossAverage
    from sfumato.train.step import train_step

    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 16, 3)
    state = helpers.plain_state(model)
    worker = SimpleNamespace(state=state, engine=state.engine)
    batch = helpers.cifar_batch(cifar_dir, 0, 8)
    hook = SpikeLossAt(21, length=4)
    guard, average, losses, spikes = (
        SpikeGuard(GUARD.model_copy(update={"armed_after_steps": 6})),
        LossAverage(),
        [],
        {},
    )
    for _ in range(30):
        hook.before_step(worker)
        loss = float(train_step(state, batch)["loss"])
        average.add(loss)
        losses.append(loss)
        if state.step % 2 == 0:
            spike = guard.observe(state.step, loss, average.value, average.updates)
            spikes.update({state.step: spike} if spike else {})
    assert all(np.isfinite(losses))
    assert min(losses[20:24]) > 10 * max(losses[:20] + losses[24:]), "the spike is steps 21-24"
    assert list(spikes) == [24] and spikes[24].first_step == 22

"""A worker's checkpoints: resuming the run folder, saving, and rolling back to an older one on a
lasting loss spike (train.spike_guard). Every rank takes part (DeepSpeed's parts, the EMA gather
under ZeRO-3, the barriers); rank 0 alone commits, and alone edits metrics.jsonl and
attempts.jsonl. The files themselves: sfumato.checkpoint."""

from __future__ import annotations

import time

from sfumato import checkpoint as ckpt
from sfumato.layout import RunFolder, append_jsonl, truncate_metrics
from sfumato.records import RollbackEvent
from sfumato.train.ranks import all_reduce_mean, say
from sfumato.train.spike import LossSpikeError, rollback_target


def resume(worker) -> None:
    """From the newest committed checkpoint of the run folder, if any (`load_checkpoint`): weights,
    optimizer, EMA, RNG, loader position, step, loss average and spike guard. Rank 0 first drops
    what a killed attempt left: partial checkpoints, and metrics lines past the checkpoint (those
    steps are logged again)."""
    import ray
    import torch.distributed as dist

    from sfumato.train.progress import LossAverage, Progress

    checkpoints, w = worker.run.checkpoints, worker
    latest = ckpt.latest(checkpoints)
    if w.rank == 0:
        ckpt.clean_partials(checkpoints)
        truncate_metrics(w.run.metrics, ckpt.load_meta(latest)["step"] if latest is not None else 0)
    dist.barrier()
    w.loss_average = LossAverage()
    if latest is not None:
        load_checkpoint(w, latest)
    nodes = [None] * w.world  # the Ray node of every rank: where the worker group ran
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if w.rank == 0:
        _record_attempt(w.run, latest, w.state.step, w.world, nodes)
    w.progress = Progress(w.cfg.train, w.state.step)


def load_checkpoint(worker, folder) -> None:
    """Every rank, from a committed checkpoint: weights, optimizer, EMA, RNG, loader position,
    step, loss average and the spike guard's rollbacks and learning-rate scale."""
    from sfumato.train.progress import LossAverage

    w = worker
    # LoRA: the checkpoint holds the adapters alone; the frozen base came from the lineage (setup).
    w.engine.load_checkpoint(
        str(folder / "deepspeed"), tag=ckpt.DEEPSPEED_TAG, load_module_strict=w.cfg.train.lora is None
    )
    w.ema.load_state_dict(w.engine.module, ckpt.load_ema(folder))
    ckpt.load_rng(folder, w.rank, w.state.generator)
    w.position = ckpt.load_loader_position(folder, w.rank)
    meta = ckpt.load_meta(folder)
    w.state.step = meta["step"]
    w.loss_average = LossAverage.from_state(meta.get("loss_average"))
    average = w.loss_average.value  # None on every rank alike (the same number of updates)
    w.spike_guard.load_state_dict(
        meta.get("spike_guard"), None if average is None else all_reduce_mean([average], w.device)[0]
    )


def _record_attempt(run: RunFolder, latest, step: int, world: int, nodes: list) -> None:
    """A line in attempts.jsonl at every start of the worker group (restarts are visible in the
    run folder) and, from the second on, on the console (Ray Train's own retry notice is INFO,
    quiet unless --verbose)."""
    from sfumato.layout import read_jsonl

    number = 1 + len([a for a in read_jsonl(run.attempts) if "event" not in a])  # rollbacks are no starts
    append_jsonl(
        run.attempts, {"time": time.time(), "resumed_from": latest and latest.name, "world_size": world, "nodes": nodes}
    )
    if latest is not None:
        say(f"attempt {number} of this run folder: resumed from {latest.name} at step {step}")
    elif number > 1:
        say(f"attempt {number} of this run folder: no checkpoint yet, training from step 0")


def save_checkpoint(worker) -> None:
    """Every rank writes its part into the partial folder; rank 0 commits it (sfumato.checkpoint)."""
    import torch.distributed as dist

    w = worker
    work = ckpt.partial_dir(w.run.checkpoints, w.state.step)
    if w.rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    w.engine.save_checkpoint(
        str(work / "deepspeed"), tag=ckpt.DEEPSPEED_TAG, exclude_frozen_parameters=w.cfg.train.lora is not None
    )
    ckpt.save_rng(work, w.rank, w.state.generator)
    ckpt.save_loader_position(work, w.rank, w.position)
    dist.barrier()  # every rank's part is on disk before rank 0 commits
    ema_weights = w.ema.state_dict(w.engine.module)  # collective under ZeRO-3
    if w.rank == 0:
        meta = {
            "step": w.state.step,
            "micro_step": w.state.micro_step,
            "model": w.cfg.train.model,
            "time": time.time(),
            "loss_average": w.loss_average.state_dict(),  # the logged loss_ema continues on resume
            "spike_guard": w.spike_guard.state_dict(),
        }  # a restart keeps the rollbacks' lower lr
        ckpt.commit(w.run.checkpoints, w.state.step, ema_weights, meta, w.cfg.train.num_to_keep)
    dist.barrier()


def roll_back(worker, spike) -> None:
    """Every rank: back to the newest committed checkpoint from before the spike began, then on
    with the learning rate scaled by train.spike_guard.lr_scale once more. No such checkpoint
    stops the run: going back to step 0 would silently restart it, which a user should choose.
    Rank 0 drops the later checkpoints and metrics lines (those steps are trained and logged
    again) and records the rollback in metrics.jsonl and attempts.jsonl."""
    import torch.distributed as dist

    from sfumato.train.progress import Progress

    w, guard = worker, worker.spike_guard
    done = {ckpt.load_meta(folder)["step"]: folder for folder in ckpt.committed(w.run.checkpoints)}
    to_step = rollback_target(sorted(done), spike.first_step)
    if to_step is None:
        raise LossSpikeError(
            f"{spike.describe()}; no committed checkpoint from before step {spike.first_step} to "
            f"roll back to (train.checkpoint_every_steps={w.cfg.train.checkpoint_every_steps})"
        )
    run_state = guard.state_dict()  # the run's rollbacks so far, not the older checkpoint's
    load_checkpoint(w, done[to_step])
    guard.rollbacks, guard.lr_scale = run_state["rollbacks"], run_state["lr_scale"]
    guard.rolled_back()
    w.progress = Progress(w.cfg.train, w.state.step)
    dist.barrier()  # every rank has loaded before rank 0 discards what came later
    if w.rank == 0:
        ckpt.discard_after(w.run.checkpoints, to_step)
        truncate_metrics(w.run.metrics, to_step)
        event = RollbackEvent(
            step=to_step,
            time=time.time(),
            spike_step=spike.step,
            first_spike_step=spike.first_step,
            loss=spike.loss,
            loss_average=spike.average,
            factor=spike.factor,
            rollback=guard.rollbacks,
            lr_scale=guard.lr_scale,
        )
        append_jsonl(w.run.metrics, event.to_json())
        append_jsonl(
            w.run.attempts,
            {
                "time": event.time,
                "event": RollbackEvent.EVENT,
                "resumed_from": done[to_step].name,
                "spike_step": spike.step,
                "world_size": w.world,
            },
        )
        say(
            f"{spike.describe()}: rolled back to step {to_step} (rollback {guard.rollbacks} of at most "
            f"{guard.cfg.max_rollbacks}), learning rate x {guard.lr_scale:g} from here"
        )
    dist.barrier()

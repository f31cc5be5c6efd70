"""One Ray Train worker's training, layered the way torchtitan's is:

    train_loop_per_worker (loop.py)  adapts Ray: the config in, the worker's loop run
      setup + resume                 model, DeepSpeed engine, EMA, state; the newest checkpoint
      run_stage                      one curriculum stage: its beta, its loader, its steps
        optimizer_step               LR, micro-batches to the accumulation boundary, EMA, hooks
          after_step                 log, validate, sample, checkpoint: each a small named step
            train_step (step.py)     plain PyTorch: forward, finite checks, backward, step

Rank 0 alone writes the run folder's files; every rank takes part in the collective calls
(barriers, the EMA gather under ZeRO-3, checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from sfumato import checkpoint as ckpt
from sfumato.config import Config
from sfumato.layout import DataFolder, RunFolder, append_jsonl, atomic_write_json, truncate_metrics
from sfumato.train.faults import Hooks
from sfumato.train.spike import LossSpikeError, RollBack, SpikeGuard, rollback_target


@dataclass
class Worker:
    """Everything one rank holds while it trains."""

    cfg: Config
    run: RunFolder
    rank: int
    world: int
    device: torch.device
    engine: object  # the DeepSpeed engine around the denoiser
    ema: object  # sfumato.train.ema.EMA
    state: object  # sfumato.train.step.TrainState
    run_model: object  # sfumato.models.run.RunModel: what sample grids are drawn with
    grid_conditions: list | None  # the sample grid's classes or prompts, cycled
    class_weights: dict | None  # train.class_balanced: class index -> acceptance probability
    hooks: list[Hooks] = field(default_factory=list)
    position: dict | None = None  # this rank's loader position (resumes mid-epoch)
    loss_average: object = None  # sfumato.train.progress.LossAverage
    progress: object = None  # sfumato.train.progress.Progress
    validation_sets: dict = field(default_factory=dict)  # resolution -> held-out batches (rank 0)
    spike_guard: SpikeGuard = field(default_factory=SpikeGuard)  # train.spike_guard; its lr scale
    selected_ids: frozenset | None = None  # a fine-tune's data (sfumato.train.finetune); None: all
    pairs: tuple | None = None  # an alignment's (PairSet, training rows, held-out rows) (train.align)
    wandb_run: object = None

    @property
    def shards(self):
        return DataFolder(self.cfg.data.output_dir).shard_folder


# ---------------------------------------------------------------------------- setup + resume
def deepspeed_config(cfg: Config, micro_batch_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip_norm or 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def setup(cfg: Config, rank: int, world: int, device: torch.device, hooks: list[Hooks]) -> Worker:
    """The model with the same initial weights on every rank, its engine, EMA and state."""
    import deepspeed

    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.run import build_run_model
    from sfumato.train.ema import EMA, stage_beta
    from sfumato.train.finetune import selected_ids
    from sfumato.train.step import GradientWatch, TrainState

    t, run = cfg.train, RunFolder(cfg.train.output_dir)
    torch.manual_seed(cfg.seed)
    run_model = build_run_model(cfg, device)
    model = run_model.denoiser
    reference = None
    if t.dpo is not None:  # the starting weights, frozen, before anything trains or is partitioned
        from sfumato.train.align import reference_copy

        reference = reference_copy(model)
    speed_up(model, t, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW: one kernel for all parameters (CPU and CUDA), 3.5x faster than the
    # per-tensor foreach one for unet-s on this CPU (10 vs 35 ms a step, BENCHMARKS.md).
    optimizer = torch.optim.AdamW(trainable, lr=t.optimizer.lr, betas=tuple(t.optimizer.betas),
                                  eps=t.optimizer.eps, weight_decay=t.optimizer.weight_decay, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, t.stages[0].micro_batch_size))
    # After initialize: under ZeRO-3 the EMA keeps only this rank's partition of each weight.
    # beta: set again at every stage start; LoRA: the adapters' average only (the base is frozen).
    ema = EMA(engine.module, stage_beta(t, t.stages[0]), trainable_only=t.lora is not None)
    num_classes = len(run_model.class_names) or None
    state = TrainState(
        engine=engine, schedule=NoiseSchedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
        generator=torch.Generator(device).manual_seed(cfg.seed * 1000 + rank), device=device,
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision],
        null_class=engine.module.null_class if num_classes else None, tokenizer=run_model.tokenizer,
        max_length=t.text.max_length, codec=run_model.codec, watch=GradientWatch(engine.module),
        all_ranks_any=lambda flag: _all_reduce_any(flag, device),
        reference=reference, dpo_beta=t.dpo.beta if t.dpo is not None else 0.0,
    )
    worker = Worker(cfg, run, rank, world, device, engine, ema, state, run_model,
                    _grid_conditions(cfg, run, run_model), _class_weights(cfg), list(hooks),
                    spike_guard=SpikeGuard(t.spike_guard), selected_ids=selected_ids(cfg))
    if t.dpo is not None:
        from sfumato.train.align import load_pairs

        worker.pairs = load_pairs(cfg, run_model.class_names)
    if rank == 0 and t.wandb:
        worker.wandb_run = _wandb(cfg)
    return worker


def speed_up(denoiser, train_cfg, device: torch.device) -> None:
    """`train.compile`: the network's forward (and so its backward) through torch.compile, in
    place (Module.compile keeps the parameter names, so checkpoints and the EMA are unchanged);
    `train.channels_last`: NHWC weights and activations for the convolutions. Both default to
    on with GPUs only: on this CPU channels-last was 4-8% slower for unet-s (BENCHMARKS.md)."""
    on_gpu = device.type == "cuda"
    if train_cfg.channels_last if train_cfg.channels_last is not None else on_gpu:
        denoiser.net.to(memory_format=torch.channels_last)
    if train_cfg.compile if train_cfg.compile is not None else on_gpu:
        denoiser.net.compile()


def _grid_conditions(cfg: Config, run: RunFolder, run_model) -> list | None:
    """The grid's conditions, cycled: the sample prompts, or the classes in index order."""
    n = cfg.train.sample.num_images
    if run_model.tokenizer is not None:
        prompts = json.loads(run.sample_prompts.read_text())
        return [prompts[i % len(prompts)] for i in range(n)]
    if run_model.class_names:
        return [i % len(run_model.class_names) for i in range(n)]
    return None


def _class_weights(cfg: Config) -> dict | None:
    if not cfg.train.class_balanced:
        return None
    shards = DataFolder(cfg.data.output_dir).shard_folder
    classes = json.loads(shards.classes.read_text())
    if not classes:
        raise ValueError("train.class_balanced needs classes (tags) in the shards, and they have none")
    weights = json.loads(shards.class_weights.read_text())
    return {classes[tag]: weight for tag, weight in weights.items()}


def resume(worker: Worker) -> None:
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


def load_checkpoint(worker: Worker, folder) -> None:
    """Every rank, from a committed checkpoint: weights, optimizer, EMA, RNG, loader position,
    step, loss average and the spike guard's rollbacks and learning-rate scale."""
    from sfumato.train.progress import LossAverage

    w = worker
    # LoRA: the checkpoint holds the adapters alone; the frozen base came from the lineage (setup).
    w.engine.load_checkpoint(str(folder / "deepspeed"), tag=ckpt.DEEPSPEED_TAG,
                             load_module_strict=w.cfg.train.lora is None)
    w.ema.load_state_dict(w.engine.module, ckpt.load_ema(folder))
    ckpt.load_rng(folder, w.rank, w.state.generator)
    w.position = ckpt.load_loader_position(folder, w.rank)
    meta = ckpt.load_meta(folder)
    w.state.step = meta["step"]
    w.loss_average = LossAverage.from_state(meta.get("loss_average"))
    average = w.loss_average.value  # None on every rank alike (the same number of updates)
    w.spike_guard.load_state_dict(meta.get("spike_guard"),
                                  None if average is None else _all_reduce_mean([average], w.device)[0])


def _record_attempt(run: RunFolder, latest, step: int, world: int, nodes: list) -> None:
    """A line in attempts.jsonl at every start of the worker group (restarts are visible in the
    run folder) and, from the second on, on the console (Ray Train's own retry notice is INFO,
    quiet unless --verbose)."""
    from sfumato.layout import read_jsonl

    number = 1 + len([a for a in read_jsonl(run.attempts) if "event" not in a])  # rollbacks are no starts
    append_jsonl(run.attempts, {"time": time.time(), "resumed_from": latest and latest.name, "world_size": world,
                                "nodes": nodes})
    if latest is not None:
        say(f"attempt {number} of this run folder: resumed from {latest.name} at step {step}")
    elif number > 1:
        say(f"attempt {number} of this run folder: no checkpoint yet, training from step 0")


# ------------------------------------------------------------------------------ the loops
def train(worker: Worker) -> None:
    """Every stage to the last step; a lasting loss spike rolls every rank back to a checkpoint
    (train.spike_guard). A non-finite loss or gradient, or a spike with no rollback left, stops
    every rank cleanly (the flags are all-reduced, so all ranks raise at the same step) and is
    not retried."""
    from sfumato.train.step import NonFiniteError

    try:
        while worker.state.step < worker.cfg.train.total_steps:
            try:
                run_stage(worker)
            except RollBack as rollback:
                roll_back(worker, rollback.spike)
    except (NonFiniteError, LossSpikeError) as err:
        if worker.rank == 0:
            kind = "loss_spike" if isinstance(err, LossSpikeError) else "non_finite"  # finish_run raises the same
            atomic_write_json(worker.run.stopped, {"error": str(err), "step": worker.state.step, "kind": kind})
    finally:
        if worker.wandb_run:
            worker.wandb_run.finish()


def stage_at(cfg: Config, step: int) -> tuple[int, int]:
    """(stage index, first step of that stage) for a global optimizer step."""
    start = 0
    for i, stage in enumerate(cfg.train.stages):
        if step < start + stage.steps:
            return i, start
        start += stage.steps
    return len(cfg.train.stages) - 1, start - cfg.train.stages[-1].steps


def run_stage(worker: Worker) -> None:
    """The rest of the current curriculum stage: its EMA beta (the same half-life in images
    whatever its batch), its resolution's shards, from the saved position if it was cut off."""
    from sfumato.data.loader import iter_training_batches, shard_paths, training_range
    from sfumato.train.ema import stage_beta

    t, w = worker.cfg.train, worker
    index, start = stage_at(w.cfg, w.state.step)
    stage = t.stages[index]
    w.ema.beta = stage_beta(t, stage)
    w.progress.start_stage(stage)
    if w.position is not None and w.position.get("stage") != index:
        w.position = None  # the checkpoint was taken in an earlier stage
    # Validation reads only held-out samples, training only the rest (a data fraction of it).
    if w.pairs is not None:  # an alignment: preference pairs, not shards
        from sfumato.data.pairs import pair_batches

        pairs, rows, _ = w.pairs
        batches = pair_batches(pairs, rows, stage.micro_batch_size, stage.resolution_px, w.rank, w.world,
                               w.cfg.seed + index, w.position)
        while w.state.step < start + stage.steps:
            after_step(w, index, optimizer_step(w, index, batches))
        return
    split = training_range(t.validation.holdout_fraction if t.validation else 0.0, t.data_fraction)
    batches = iter_training_batches(shard_paths(w.shards.root, stage.resolution_px), stage.micro_batch_size,
                                    stage.resolution_px, w.rank, w.world, w.cfg.seed + index, w.position,
                                    w.class_weights, split, source_weights=w.cfg.data.source_weights,
                                    bucketed=w.cfg.data.shards.buckets is not None, ids=w.selected_ids)
    cache = _latent_cache(w, stage.resolution_px)
    if cache is not None:
        batches = cache.attach_all(batches)
    while w.state.step < start + stage.steps:
        out = optimizer_step(w, index, batches)
        after_step(w, index, out)


def _latent_cache(worker: Worker, resolution_px: int, announce: bool = True):
    """The stage's cache (sfumato.models.cache) when it is complete for these shards and this
    VAE / frozen text encoder: batches then carry each image's posterior mean and std (and its
    caption's encoder states) and those encoders never run. None: encode on the fly (nothing to
    cache, no cache, or an incomplete one)."""
    from sfumato.models.cache import LatentCache, cache_enabled

    if cache_enabled(worker.cfg) is not None:
        return None
    cache = LatentCache.open(worker.cfg, resolution_px)
    if announce and worker.rank == 0:
        say(f"{resolution_px}px: training from the cache {cache.folder.root}" if cache is not None else
            f"{resolution_px}px: no complete latent cache for this VAE (`sfumato cache` builds it): "
            "the VAE encodes every batch")
    return cache


def optimizer_step(worker: Worker, stage_index: int, batches) -> dict:
    """Micro-batches up to the accumulation boundary at this step's LR, then the EMA."""
    from sfumato.train.step import lr_at, train_step

    w = worker
    for hook in w.hooks:
        hook.before_step(w)
    lr = lr_at(w.state.step, w.cfg.train.optimizer, w.cfg.train.total_steps) * w.spike_guard.lr_scale  # < 1 after rollbacks
    for group in w.engine.optimizer.param_groups:
        group["lr"] = lr
    while True:
        batch, position = next(batches)
        w.position = {**position, "stage": stage_index}
        out = train_step(w.state, batch)
        w.progress.add_samples(len(batch["id"]) * w.world)
        if out["optimizer_step"]:
            break
    w.ema.update(w.engine.module)
    w.loss_average.add(out["loss"])  # no read-back: a device tensor until logged
    for hook in w.hooks:
        hook.after_step(w)
    return {**out, "lr": lr}


def after_step(worker: Worker, stage_index: int, out: dict) -> None:
    """What follows an optimizer step, each when it is due: the log record, validation and the
    sample grid (from the EMA weights), the metrics line, the loss-spike guard, the checkpoint
    (never one of a confirmed spike)."""
    t, step = worker.cfg.train, worker.state.step
    last = step == t.total_steps
    logged = step % t.log_every_steps == 0 or last
    record = log_record(worker, stage_index, out) if logged else {}
    sample_now = step % t.sample_every_steps == 0 or last
    if t.dpo is None:
        validate_now = t.validation is not None and (step % t.validation.every_steps == 0 or last)
    else:  # an alignment: the held-out pairs' reward accuracy, with every grid
        validate_now = sample_now or (t.validation is not None and step % t.validation.every_steps == 0)
    if validate_now or sample_now:
        record.update(evaluate_ema(worker, stage_index, validate_now, sample_now))
    if record or validate_now:  # every rank reports, or none (Ray Train counts the reports)
        write_metrics(worker, record)
    if logged:
        watch_loss(worker, out)
    if step % t.checkpoint_every_steps == 0 or last:
        save_checkpoint(worker)


# ---------------------------------------------------------------------- the loss-spike guard
def watch_loss(worker: Worker, out: dict) -> None:
    """train.spike_guard on a logged step, with the loss and its running average each averaged
    over the ranks (one small all-reduce), so every rank decides alike: a confirmed spike raises
    RollBack (caught by `train`) or LossSpikeError (the run stops) on all of them."""
    w = worker
    if w.spike_guard.cfg is None:
        return
    loss, average = _all_reduce_mean([float(out["loss"]), w.loss_average.value], w.device)
    spike = w.spike_guard.observe(w.state.step, loss, average, w.loss_average.updates)
    if spike is not None:
        raise w.spike_guard.decide(spike)


def roll_back(worker: Worker, spike) -> None:
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
        raise LossSpikeError(f"{spike.describe()}; no committed checkpoint from before step {spike.first_step} to "
                             f"roll back to (train.checkpoint_every_steps={w.cfg.train.checkpoint_every_steps})")
    run_state = guard.state_dict()  # the run's rollbacks so far, not the older checkpoint's
    load_checkpoint(w, done[to_step])
    guard.rollbacks, guard.lr_scale = run_state["rollbacks"], run_state["lr_scale"]
    guard.rolled_back()
    w.progress = Progress(w.cfg.train, w.state.step)
    dist.barrier()  # every rank has loaded before rank 0 discards what came later
    if w.rank == 0:
        ckpt.discard_after(w.run.checkpoints, to_step)
        truncate_metrics(w.run.metrics, to_step)
        now = time.time()
        append_jsonl(w.run.metrics, {"event": "rollback", "step": to_step, "time": now, "spike_step": spike.step,
                                     "first_spike_step": spike.first_step, "loss": spike.loss,
                                     "loss_average": spike.average, "factor": spike.factor,
                                     "rollback": guard.rollbacks, "lr_scale": guard.lr_scale})
        append_jsonl(w.run.attempts, {"time": now, "event": "rollback", "resumed_from": done[to_step].name,
                                      "spike_step": spike.step, "world_size": w.world})
        say(f"{spike.describe()}: rolled back to step {to_step} (rollback {guard.rollbacks} of at most "
            f"{guard.cfg.max_rollbacks}), learning rate x {guard.lr_scale:g} from here")
    dist.barrier()


def log_record(worker: Worker, stage_index: int, out: dict) -> dict:
    from sfumato.train.ema import halflife_images

    w, t = worker, worker.cfg.train
    stage = t.stages[stage_index]
    grad_norm = w.engine.get_global_grad_norm()
    return {
        "stage": stage_index, "resolution_px": stage.resolution_px,
        "loss": float(out["loss"]), "loss_ema": w.loss_average.value, "lr": out["lr"],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        **w.progress.measure(w.state.step),  # samples_per_s, step_time_s, elapsed_s, eta_s
        "effective_batch": t.effective_batch(stage), "ema_beta": w.ema.beta,
        "ema_halflife_images": halflife_images(w.ema.beta, t.effective_batch(stage)),
        "memory_mb": _memory_mb(w.device),
        **_source_shares(w),
        **{key: float(out[key]) for key in ("reward_accuracy", "reward_margin") if key in out},  # alignment
    }


def _source_shares(worker: Worker) -> dict:
    """With data.sources weights: this rank's realised share of each source in the stage so far
    (every rank draws with the same weights)."""
    from sfumato.data.loader import source_shares

    shares = source_shares(worker.position)
    return {} if shares is None else {"source_shares": {name: round(share, 4) for name, share in shares.items()}}


def evaluate_ema(worker: Worker, stage_index: int, validate_now: bool, sample_now: bool) -> dict:
    """Rank 0, from a copy holding the EMA weights: the validation loss and/or the sample grid.
    Every rank joins the EMA gather (collective under ZeRO-3) and the barrier after."""
    import torch.distributed as dist

    from sfumato.data.loader import shard_paths, validation_batches
    from sfumato.train.step import validate

    w, v = worker, worker.cfg.train.validation
    stage = w.cfg.train.stages[stage_index]
    found = {}
    ema_weights = w.ema.state_dict(w.engine.module)
    if w.rank == 0:
        ema_model = _ema_copy(w.run_model.denoiser, ema_weights, w.device, lora=w.cfg.train.lora is not None)
        if validate_now and w.pairs is not None:
            from sfumato.train.align import heldout_stats, policy_distance

            pairs, _, heldout = w.pairs
            found.update(heldout_stats(ema_model, pairs, heldout, stage.resolution_px, stage.micro_batch_size, w.state,
                                       v.seed if v is not None else 0))
            found["policy_distance"] = policy_distance(ema_model, w.state.reference)
        elif validate_now:
            if stage.resolution_px not in w.validation_sets:
                w.validation_sets[stage.resolution_px] = validation_batches(
                    shard_paths(w.shards.root, stage.resolution_px), stage.resolution_px,
                    v.holdout_fraction, v.max_samples, v.batch_size, bucketed=w.cfg.data.shards.buckets is not None,
                    ids=w.selected_ids)
                cache = _latent_cache(w, stage.resolution_px, announce=False)
                if cache is not None:
                    w.validation_sets[stage.resolution_px] = [cache.attach(b) for b in w.validation_sets[stage.resolution_px]]
            found["val_loss"] = validate(ema_model, w.validation_sets[stage.resolution_px], w.state,
                                         v.num_timesteps, v.seed)
        if sample_now:
            sample_grid(w, ema_model, stage.resolution_px)
    dist.barrier()
    return found if validate_now else {}


def write_metrics(worker: Worker, record: dict) -> None:
    """metrics.jsonl, wandb and the console (rank 0); every rank reports to Ray Train."""
    import ray.train

    from sfumato.train.progress import progress_line

    w = worker
    record = {"step": w.state.step, "time": time.time(), "world_size": w.world, **record}
    if w.rank == 0:
        append_jsonl(w.run.metrics, record)
        if w.wandb_run:
            w.wandb_run.log(record, step=w.state.step)
        say(progress_line(record, w.cfg.train.total_steps))
    ray.train.report(record)  # Ray Train forwards rank 0's


def save_checkpoint(worker: Worker) -> None:
    """Every rank writes its part into the partial folder; rank 0 commits it (sfumato.checkpoint)."""
    import torch.distributed as dist

    w = worker
    work = ckpt.partial_dir(w.run.checkpoints, w.state.step)
    if w.rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    w.engine.save_checkpoint(str(work / "deepspeed"), tag=ckpt.DEEPSPEED_TAG,
                             exclude_frozen_parameters=w.cfg.train.lora is not None)
    ckpt.save_rng(work, w.rank, w.state.generator)
    ckpt.save_loader_position(work, w.rank, w.position)
    dist.barrier()  # every rank's part is on disk before rank 0 commits
    ema_weights = w.ema.state_dict(w.engine.module)  # collective under ZeRO-3
    if w.rank == 0:
        meta = {"step": w.state.step, "micro_step": w.state.micro_step, "model": w.cfg.train.model, "time": time.time(),
                "loss_average": w.loss_average.state_dict(),  # the logged loss_ema continues on resume
                "spike_guard": w.spike_guard.state_dict()}  # a restart keeps the rollbacks' lower lr
        ckpt.commit(w.run.checkpoints, w.state.step, ema_weights, meta, w.cfg.train.num_to_keep)
    dist.barrier()


def sample_grid(worker: Worker, model, resolution_px: int) -> None:
    """A grid from the EMA weights (`model`) on fixed noise (and fixed classes or prompts,
    cycled), at the current stage's resolution; in latent mode the latents are sampled, then
    decoded by the VAE."""
    from dataclasses import replace

    from sfumato.diffusion.sample import sample, to_grid
    from sfumato.models.run import pipeline

    s = worker.cfg.train.sample
    pipe = pipeline(worker.cfg, replace(worker.run_model, denoiser=model), s.sampler)
    width, height = worker.cfg.sample_size_px(resolution_px)  # square, or train.sample.aspect_ratio's bucket
    images = sample(pipe, s.num_images, s.seed, s.steps, s.guidance_scale, worker.grid_conditions,
                    height=height, width=width)
    path = worker.run.sample_grid(worker.state.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_grid(images).save(path)


# ---------------------------------------------------------------------------------- helpers
def say(line: str) -> None:
    """One line to the driver's console. Not print(): Ray Train V2 patches print in its workers
    to log and also echo each line, and the console would show every line twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _all_reduce_any(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    value = flag.to(device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.bool().cpu()


def _all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).tolist()


def _ema_copy(denoiser, ema_weights: dict, device, lora: bool = False) -> torch.nn.Module:
    """A copy of the denoiser holding the EMA weights, for grids and validation (LoRA: the frozen
    base and the adapters' EMA)."""
    import copy

    from sfumato.models.registry import empty_like
    from sfumato.models.run import fill_parameters

    model = (copy.deepcopy(denoiser) if lora else empty_like(denoiser)).to(device).eval()
    fill_parameters(model, ema_weights, "the EMA weights", subset=lora)
    return model


def _memory_mb(device: torch.device) -> float:
    import psutil

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _wandb(cfg: Config):
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project="sfumato", name=cfg.name, dir=str(cfg.train.output_dir), mode=mode,
                      config=cfg.model_dump(mode="json"))

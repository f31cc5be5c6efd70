"""One Ray Train worker's training, layered the way torchtitan's is:

    train_loop_per_worker (loop.py)  adapts Ray: the config in, the worker's loop run
      setup + resume                 model, task, DeepSpeed engine, EMA, state; the newest checkpoint
      run_stage                      one curriculum stage: its beta, the task's batches, its steps
        optimizer_step               LR, micro-batches to the accumulation boundary, EMA, hooks
          after_step                 log, validate, sample, checkpoint: each a small named step
            train_step (step.py)     plain PyTorch: the task's loss, finite checks, backward, step

What is trained comes from the run's task (sfumato.train.tasks: pre-training, fine-tuning, DPO):
its batches, its loss, when and how it validates, its own log fields. The loop never asks which
task it runs. Checkpoints, resume and loss-spike rollbacks: sfumato.train.checkpointing.

Rank 0 alone writes the run folder's files; every rank takes part in the collective calls
(barriers, the EMA gather under ZeRO-3, checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from sfumato.config import Config
from sfumato.layout import RunFolder, append_jsonl, atomic_write_json
from sfumato.records import MetricsLine, Record, TrainStepRecord
from sfumato.train.checkpointing import roll_back, save_checkpoint
from sfumato.train.faults import Hooks
from sfumato.train.ranks import all_reduce_any, all_reduce_mean, say
from sfumato.train.spike import LossSpikeError, RollBack, SpikeGuard
from sfumato.train.tasks import Task, make_task


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
    task: Task  # what is trained: its batches, loss, validation (sfumato.train.tasks)
    grid_conditions: list | None  # the sample grid's classes or prompts, cycled
    hooks: list[Hooks] = field(default_factory=list)
    position: dict | None = None  # this rank's loader position (resumes mid-epoch)
    loss_average: object = None  # sfumato.train.progress.LossAverage
    progress: object = None  # sfumato.train.progress.Progress
    spike_guard: SpikeGuard = field(default_factory=SpikeGuard)  # train.spike_guard; its lr scale
    wandb_run: object = None
    quality: object = None  # sfumato.train.quality.QualityWatch (rank 0, with train.quality)


# ------------------------------------------------------------------------------------ setup
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
    """The model with the same initial weights on every rank, its task, engine, EMA and state."""
    import deepspeed

    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.run import build_run_model
    from sfumato.train.ema import EMA, stage_beta
    from sfumato.train.step import GradientWatch, TrainState

    t, run = cfg.train, RunFolder(cfg.train.output_dir)
    torch.manual_seed(cfg.seed)
    run_model = build_run_model(cfg, device)
    model = run_model.denoiser
    repa = None
    if t.repa is not None:  # the frozen encoder, and the projector the optimizer then trains
        from sfumato.models.repa import attach

        repa = attach(model, t.repa, device)
    task = make_task(cfg, run_model)  # before anything trains or is partitioned (an alignment's reference)
    speed_up(model, t, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW: one kernel for all parameters (CPU and CUDA), 3.5x faster than the
    # per-tensor foreach one for unet-s on this CPU (10 vs 35 ms a step, BENCHMARKS.md).
    optimizer = torch.optim.AdamW(
        trainable,
        lr=t.optimizer.lr,
        betas=tuple(t.optimizer.betas),
        eps=t.optimizer.eps,
        weight_decay=t.optimizer.weight_decay,
        fused=True,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, t.stages[0].micro_batch_size)
    )
    # After initialize: under ZeRO-3 the EMA keeps only this rank's partition of each weight.
    # beta: set again at every stage start; LoRA: the adapters' average only (the base is frozen).
    ema = EMA(engine.module, stage_beta(t, t.stages[0]), trainable_only=t.lora is not None)
    num_classes = len(run_model.class_names) or None
    state = TrainState(
        engine=engine,
        schedule=NoiseSchedule.from_config(cfg.diffusion),
        diffusion_cfg=cfg.diffusion,
        generator=torch.Generator(device).manual_seed(cfg.seed * 1000 + rank),
        device=device,
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision],
        null_class=engine.module.null_class if num_classes else None,
        tokenizer=run_model.tokenizer,
        max_length=t.text.max_length,
        codec=run_model.codec,
        watch=GradientWatch(engine.module),
        all_ranks_any=lambda flag: all_reduce_any(flag, device),
        repa=repa,
    )
    worker = Worker(
        cfg,
        run,
        rank,
        world,
        device,
        engine,
        ema,
        state,
        run_model,
        task,
        _grid_conditions(cfg, run, run_model),
        list(hooks),
        spike_guard=SpikeGuard(t.spike_guard),
    )
    if rank == 0 and t.wandb:
        worker.wandb_run = _wandb(cfg)
    if rank == 0 and t.quality is not None:
        from sfumato.train.quality import QualityWatch

        prompts = json.loads(run.sample_prompts.read_text()) if run_model.tokenizer is not None else None
        worker.quality = QualityWatch.build(cfg, run_model, prompts)
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
    whatever its batch), the task's batches at its resolution, from the saved position if it
    was cut off."""
    from sfumato.train.ema import stage_beta

    t, w = worker.cfg.train, worker
    index, start = stage_at(w.cfg, w.state.step)
    stage = t.stages[index]
    w.ema.beta = stage_beta(t, stage)
    w.progress.start_stage(stage)
    if w.position is not None and w.position.get("stage") != index:
        w.position = None  # the checkpoint was taken in an earlier stage
    batches = w.task.batches(index, w.rank, w.world, w.position)
    while w.state.step < start + stage.steps:
        out = optimizer_step(w, index, batches)
        after_step(w, index, out)


def optimizer_step(worker: Worker, stage_index: int, batches) -> dict:
    """Micro-batches up to the accumulation boundary at this step's LR, then the EMA."""
    from sfumato.train.step import lr_at, train_step

    w = worker
    for hook in w.hooks:
        hook.before_step(w)
    lr = (
        lr_at(w.state.step, w.cfg.train.optimizer, w.cfg.train.total_steps) * w.spike_guard.lr_scale
    )  # < 1 after rollbacks
    for group in w.engine.optimizer.param_groups:
        group["lr"] = lr
    if w.cfg.train.masking is not None:  # masked until the run's last unmasked_fraction
        from sfumato.models.run import training_levers

        training_levers(w.engine.module, w.cfg.train, w.state.step / w.cfg.train.total_steps)
    while True:
        batch, position = next(batches)
        w.position = {**position, "stage": stage_index}
        out = train_step(w.state, batch, w.task.loss)
        w.progress.add_samples(len(batch["id"]) * w.world)
        if out["optimizer_step"]:
            break
    w.ema.update(w.engine.module)
    w.loss_average.add(out["loss"])  # no read-back: a device tensor until logged
    for hook in w.hooks:
        hook.after_step(w)
    return {**out, "lr": lr}


def after_step(worker: Worker, stage_index: int, out: dict) -> None:
    """What follows an optimizer step, each when it is due: the log records, validation (when
    the task says it is due) and the sample grid, both from the EMA weights, the metrics line,
    the loss-spike guard, the checkpoint (never one of a confirmed spike)."""
    t, step = worker.cfg.train, worker.state.step
    last = step == t.total_steps
    logged = step % t.log_every_steps == 0 or last
    records = log_records(worker, stage_index, out) if logged else ()
    sample_now = step % t.sample_every_steps == 0 or last
    validate_now = worker.task.validation_due(step, last, sample_now)
    watch_now = t.quality is not None and (step % t.quality.every_steps == 0 or last)
    if validate_now or sample_now or watch_now:
        records += evaluate_ema(worker, stage_index, validate_now, sample_now, watch_now)
    if records or validate_now or watch_now:  # every rank reports, or none (Ray Train counts the reports)
        write_metrics(worker, records)
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
    loss, average = all_reduce_mean([float(out["loss"]), w.loss_average.value], w.device)
    spike = w.spike_guard.observe(w.state.step, loss, average, w.loss_average.updates)
    if spike is not None:
        raise w.spike_guard.decide(spike)


def log_records(worker: Worker, stage_index: int, out: dict) -> tuple[Record, ...]:
    """A logged step's records: the step's own, then the task's."""
    from sfumato.train.ema import halflife_images

    w, t = worker, worker.cfg.train
    stage = t.stages[stage_index]
    grad_norm = w.engine.get_global_grad_norm()
    step = TrainStepRecord(
        stage=stage_index,
        resolution_px=stage.resolution_px,
        loss=float(out["loss"]),
        loss_ema=w.loss_average.value,
        lr=out["lr"],
        grad_norm=None if grad_norm is None else float(grad_norm),
        **w.progress.measure(w.state.step),  # samples_per_s, step_time_s, elapsed_s, eta_s
        effective_batch=t.effective_batch(stage),
        ema_beta=w.ema.beta,
        ema_halflife_images=halflife_images(w.ema.beta, t.effective_batch(stage)),
        memory_mb=_memory_mb(w.device),
    )
    return (step, *w.task.log_records(out, w.position))


def evaluate_ema(
    worker: Worker, stage_index: int, validate_now: bool, sample_now: bool, watch_now: bool = False
) -> tuple[Record, ...]:
    """Rank 0, from a copy holding the EMA weights: the task's validation records, the sample
    grid and the watched quality (train.quality), each when due. Every rank joins the EMA gather
    (collective under ZeRO-3) and the barrier after."""
    import torch.distributed as dist

    w = worker
    found = ()
    ema_weights = w.ema.state_dict(w.engine.module)
    if w.rank == 0:
        ema_model = _ema_copy(w.run_model.denoiser, ema_weights, w.device, lora=w.cfg.train.lora is not None)
        if validate_now:
            found = w.task.validate(ema_model, stage_index, w.state)
        if sample_now:
            sample_grid(w, ema_model, w.cfg.train.stages[stage_index].resolution_px)
        if watch_now:
            resolution_px = w.cfg.train.stages[stage_index].resolution_px
            found = (*found, w.quality.measure(w.cfg, w.run_model, ema_model, resolution_px))
    dist.barrier()
    return found


def write_metrics(worker: Worker, records: tuple[Record, ...]) -> None:
    """One metrics line: metrics.jsonl, wandb and the console (rank 0); every rank reports to Ray Train."""
    import ray.train

    from sfumato.train.progress import progress_line

    w = worker
    line = MetricsLine(w.state.step, time.time(), w.world, records)
    record = line.to_json()
    if w.rank == 0:
        append_jsonl(w.run.metrics, record)
        if w.wandb_run:
            w.wandb_run.log(record, step=w.state.step)
        say(progress_line(line, w.cfg.train.total_steps))
    ray.train.report(record)  # Ray Train forwards rank 0's


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
    images = sample(
        pipe,
        s.num_images,
        s.seed,
        s.steps,
        s.guidance_scale,
        worker.grid_conditions,
        height=height,
        width=width,
        guidance_interval=s.guidance_interval,
    )
    path = worker.run.sample_grid(worker.state.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_grid(images).save(path)


# ---------------------------------------------------------------------------------- helpers
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
    return wandb.init(
        project="sfumato", name=cfg.name, dir=str(cfg.train.output_dir), mode=mode, config=cfg.model_dump(mode="json")
    )

"""Ray Train (V2 `TorchTrainer`) + DeepSpeed around the plain `train_step`.

`train_loop_per_worker` only adapts: it builds the model and the DeepSpeed engine from the
config, feeds each rank its slice of the shards, and handles resume, EMA, metrics, sample grids
and checkpoints. The driver side, `run_training`, writes the resolved config into the run
folder and maps a stop on NaN/Inf to an error that Ray does not retry.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil
import torch

from sfumato.config import Config, validate_config, write_resolved
from sfumato.train import checkpoint as ckpt

log = logging.getLogger(__name__)

STOPPED = "STOPPED.json"  # written when the run stops on non-finite values
SAMPLE_PROMPTS = Path("text") / "sample_prompts.json"


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


def _stage_at(cfg: Config, step: int) -> tuple[int, int]:
    """(stage index, first step of that stage) for a global optimizer step."""
    start = 0
    for i, stage in enumerate(cfg.train.stages):
        if step < start + stage.steps:
            return i, start
        start += stage.steps
    return len(cfg.train.stages) - 1, start - cfg.train.stages[-1].steps


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = validate_config(loop_config["config"], inputs=False)
    t = cfg.train
    _quiet_worker(t)  # before DeepSpeed's import: it picks its accelerator then

    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    from sfumato.data.loader import iter_training_batches, shard_paths, training_range, validation_batches
    from sfumato.data.shards import CLASS_WEIGHTS, CLASSES
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.run import build_run_model
    from sfumato.train.ema import EMA, halflife_images, stage_beta
    from sfumato.train.progress import LossAverage, Progress, progress_line
    from sfumato.train.step import GradientWatch, NonFiniteError, TrainState, lr_at, train_step, validate

    run_dir, shards_dir = t.output_dir, cfg.data.output_dir / "shards"
    checkpoints = run_dir / "checkpoints"
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]

    classes = json.loads((shards_dir / CLASSES).read_text())
    class_weights = None
    if t.class_balanced:
        if not classes:
            raise ValueError("train.class_balanced needs classes (tags) in the shards, and they have none")
        weights = json.loads((shards_dir / CLASS_WEIGHTS).read_text())
        class_weights = {classes[tag]: weight for tag, weight in weights.items()}
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    run_model = build_run_model(cfg, device)
    model, codec, tokenizer = run_model.denoiser, run_model.codec, run_model.tokenizer
    num_classes = len(run_model.class_names) or None
    # The grid's conditions, cycled: the sample prompts, or the classes in index order.
    cond_for_grid = None
    if tokenizer is not None:
        prompts = json.loads((run_dir / SAMPLE_PROMPTS).read_text())
        cond_for_grid = [prompts[i % len(prompts)] for i in range(t.sample.num_images)]
    elif num_classes:
        cond_for_grid = [i % num_classes for i in range(t.sample.num_images)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.optimizer.lr, betas=tuple(t.optimizer.betas),
                                  eps=t.optimizer.eps, weight_decay=t.optimizer.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, t.stages[0].micro_batch_size))
    # After initialize: under ZeRO-3 the EMA keeps only this rank's partition of each weight.
    ema = EMA(engine.module, stage_beta(t, t.stages[0]))  # beta: set again at every stage start
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    state = TrainState(
        engine=engine, schedule=NoiseSchedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
        generator=generator, device=device, dtype=dtype,
        null_class=engine.module.null_class if num_classes else None, tokenizer=tokenizer,
        max_length=t.text.max_length, codec=codec, watch=GradientWatch(engine.module),
        all_ranks_any=lambda flag: _all_reduce_any(flag, device),
    )

    # Resume from the newest committed checkpoint of this run folder, if any.
    position, loss_average = None, LossAverage()
    if rank == 0:
        ckpt.clean_partials(checkpoints)
    dist.barrier()
    latest = ckpt.latest(checkpoints)
    if latest is not None:
        engine.load_checkpoint(str(latest / "deepspeed"), tag=ckpt.DEEPSPEED_TAG)
        ema.load_state_dict(engine.module, ckpt.load_ema(latest))
        ckpt.load_rng(latest, rank, generator)
        position = ckpt.load_loader_position(latest, rank)
        meta = ckpt.load_meta(latest)
        state.step = meta["step"]
        loss_average = LossAverage.from_state(meta.get("loss_average"))
    nodes = [None] * world  # the Ray node of every rank: where the worker group ran
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        _record_attempt(run_dir, latest, state.step, world, nodes)

    # Validation reads only held-out samples, training only the rest (a data fraction of it).
    v = t.validation
    split = training_range(v.holdout_fraction if v else 0.0, t.data_fraction)
    validation_sets: dict[int, list[dict]] = {}  # resolution -> held-out batches (rank 0)
    metrics_file = run_dir / "metrics.jsonl"
    wandb_run = _wandb(cfg) if rank == 0 and t.wandb else None
    progress = Progress(t, state.step)
    fail_at = loop_config.get("inject_failure_at_step")
    nan_at = loop_config.get("inject_nan_at_step")
    try:
        while state.step < t.total_steps:
            stage_index, stage_start = _stage_at(cfg, state.step)
            stage = t.stages[stage_index]
            ema.beta = stage_beta(t, stage)  # the same half-life in images whatever the stage's batch
            progress.start_stage(stage)
            if position is not None and position.get("stage") != stage_index:
                position = None  # the checkpoint was taken in an earlier stage
            batches = iter_training_batches(shard_paths(shards_dir, stage.resolution_px), stage.micro_batch_size,
                                            stage.resolution_px, rank, world, cfg.seed + stage_index, position,
                                            class_weights, split)
            while state.step < stage_start + stage.steps:
                lr = lr_at(state.step, t.optimizer, t.total_steps)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                if nan_at is not None and state.step == nan_at and rank == world - 1:
                    with torch.no_grad():  # poison one rank's weights: only it sees NaN
                        next(engine.module.parameters()).mul_(float("nan"))
                batch, position = next(batches)
                position = {**position, "stage": stage_index}
                out = train_step(state, batch)
                progress.add_samples(len(batch["id"]) * world)
                if not out["optimizer_step"]:
                    continue
                ema.update(engine.module)
                loss_average.update(out["loss"])
                step = state.step
                if fail_at is not None and step == fail_at and rank == world - 1 and not (run_dir / ".injected").exists():
                    (run_dir / ".injected").write_text(str(step))
                    os._exit(1)  # a worker dies without warning; Ray restarts the group
                record = {}
                if step % t.log_every_steps == 0 or step == t.total_steps:
                    grad_norm = engine.get_global_grad_norm()
                    record = {
                        "stage": stage_index, "resolution_px": stage.resolution_px,
                        "loss": out["loss"], "loss_ema": loss_average.value, "lr": lr,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        **progress.measure(step),  # samples_per_s, step_time_s, elapsed_s, eta_s
                        "effective_batch": t.effective_batch(stage), "ema_beta": ema.beta,
                        "ema_halflife_images": halflife_images(ema.beta, t.effective_batch(stage)),
                        "memory_mb": _memory_mb(device),
                    }
                validate_now = v is not None and (step % v.every_steps == 0 or step == t.total_steps)
                sample_now = step % t.sample_every_steps == 0 or step == t.total_steps
                if validate_now or sample_now:
                    ema_weights = ema.state_dict(engine.module)  # collective under ZeRO-3
                    if rank == 0:
                        ema_model = _ema_copy(run_model.denoiser, ema_weights, device)
                        if validate_now:
                            if stage.resolution_px not in validation_sets:
                                validation_sets[stage.resolution_px] = validation_batches(
                                    shard_paths(shards_dir, stage.resolution_px), stage.resolution_px,
                                    v.holdout_fraction, v.max_samples, v.batch_size)
                            record["val_loss"] = validate(ema_model, validation_sets[stage.resolution_px], state,
                                                          v.num_timesteps, v.seed)
                        if sample_now:
                            _sample_grid(cfg, run_model, ema_model, cond_for_grid, stage.resolution_px, step, device)
                    dist.barrier()
                if record or validate_now:
                    record = {"step": step, "time": time.time(), "world_size": world, **record}
                    if rank == 0:
                        with metrics_file.open("a") as fh:
                            fh.write(json.dumps(record) + "\n")
                        if wandb_run:
                            wandb_run.log(record, step=step)
                        _say(progress_line(record, t.total_steps))
                    ray.train.report(record)  # every rank reports; Ray Train forwards rank 0's
                if step % t.checkpoint_every_steps == 0 or step == t.total_steps:
                    _checkpoint(cfg, engine, ema, state, position, loss_average, rank, dist)
    except NonFiniteError as err:
        # Every rank saw the same all-reduced flag, so every rank stops here, cleanly.
        if rank == 0:
            (run_dir / STOPPED).write_text(json.dumps({"error": str(err), "step": state.step}))
        return
    finally:
        if wandb_run:
            wandb_run.finish()


def _say(line: str) -> None:
    """One line to the driver's console. Not print(): Ray Train V2 patches print in its workers
    to log and also echo each line, and the console would show every line twice."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_worker(t) -> None:
    """This worker's console (sfumato.console): on CPUs DeepSpeed is told its accelerator (it
    warns that it found none otherwise); unless verbose, the known-harmless warnings go, and
    so does Ray Train V2's INFO line per `ray.train.report` ("Reporting training result ...: ..."),
    the whole metrics dict again after each progress line, which rank 0's line says once."""
    from sfumato.console import is_verbose, quiet_harmless

    if not t.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if is_verbose():
        return
    quiet_harmless()
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names that logger by its file


def _record_attempt(run_dir: Path, latest: Path | None, step: int, world: int, nodes: list) -> None:
    """Rank 0, at every start of the worker group: a line in attempts.jsonl (restarts are visible
    in the run folder) and, from the second on, on the console (Ray Train's own retry notice is
    INFO, quiet unless --verbose)."""
    attempts = run_dir / "attempts.jsonl"
    number = 1 + (len(attempts.read_text().splitlines()) if attempts.exists() else 0)
    with attempts.open("a") as fh:
        fh.write(json.dumps({"time": time.time(), "resumed_from": latest and latest.name, "world_size": world,
                            "nodes": nodes}) + "\n")
    if latest is not None:
        _say(f"attempt {number} of this run folder: resumed from {latest.name} at step {step}")
    elif number > 1:
        _say(f"attempt {number} of this run folder: no checkpoint yet, training from step 0")


def _all_reduce_any(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    value = flag.to(device=device, dtype=torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.bool().cpu()[0]


def _checkpoint(cfg: Config, engine, ema, state, position: dict, loss_average, rank: int, dist) -> None:
    checkpoints = cfg.train.output_dir / "checkpoints"
    work = ckpt.partial_dir(checkpoints, state.step)
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(work / "deepspeed"), tag=ckpt.DEEPSPEED_TAG)
    ckpt.save_rng(work, rank, state.generator)
    ckpt.save_loader_position(work, rank, position)
    dist.barrier()  # every rank's part is on disk before rank 0 commits
    ema_weights = ema.state_dict(engine.module)  # collective under ZeRO-3
    if rank == 0:
        meta = {"step": state.step, "micro_step": state.micro_step, "model": cfg.train.model, "time": time.time(),
                "loss_average": loss_average.state_dict()}  # the logged loss_ema continues on resume
        ckpt.commit(checkpoints, state.step, ema_weights, meta, cfg.train.num_to_keep)
    dist.barrier()


def _ema_copy(denoiser, ema_weights: dict, device) -> torch.nn.Module:
    """A copy of the denoiser holding the EMA weights, for grids and validation."""
    from sfumato.models.registry import empty_like
    from sfumato.models.run import fill_parameters

    model = empty_like(denoiser).to(device).eval()
    fill_parameters(model, ema_weights, "the EMA weights")
    return model


def _sample_grid(cfg, run_model, model, conditions, resolution_px, step, device) -> None:
    """A grid from the EMA weights (`model`) on fixed noise (and fixed classes or prompts,
    cycled), at the current stage's resolution; in latent mode the latents are sampled, then
    decoded by the VAE."""
    from dataclasses import replace

    from sfumato.diffusion.sample import sample, to_grid
    from sfumato.models.run import pipeline

    s = cfg.train.sample
    pipe = pipeline(cfg, replace(run_model, denoiser=model), s.sampler)
    images = sample(pipe, s.num_images, s.seed, s.steps, s.guidance_scale, conditions,
                    height=resolution_px, width=resolution_px)
    folder = cfg.train.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    to_grid(images).save(folder / f"step-{step:08d}.png")


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def _wandb(cfg: Config):
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project="sfumato", name=cfg.name, dir=str(cfg.train.output_dir), mode=mode,
                      config=cfg.model_dump(mode="json"))


def _check_vae(cfg: Config) -> None:
    """Before any worker starts: the VAE's config is readable and every stage's resolution
    divides into latents."""
    from diffusers import AutoencoderKL

    vae = cfg.train.vae
    try:
        vae_config = AutoencoderKL.load_config(vae.pretrained, subfolder=vae.subfolder)
    except (OSError, ValueError) as err:
        raise ValueError(f"train.vae.pretrained={vae.pretrained!r} (subfolder {vae.subfolder!r}) has no "
                         f"readable AutoencoderKL config: {err}") from None
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    for i, stage in enumerate(cfg.train.stages):
        if stage.resolution_px % factor:
            raise ValueError(f"train.stages.{i}.resolution_px={stage.resolution_px} is not a multiple of the "
                             f"VAE's downsampling factor {factor}")


def _keep_classes(cfg: Config) -> None:
    """The run keeps the class index -> name map it trains with (evaluation and export read it),
    taken from the shards at its first start."""
    from sfumato.data.shards import CLASSES
    from sfumato.models.run import RUN_CLASSES

    target = cfg.train.output_dir / RUN_CLASSES
    if not target.exists():
        source = cfg.data.output_dir / "shards" / CLASSES
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist: run `sfumato shards` before training")
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(source.read_text())
        os.replace(tmp, target)


def _prepare_text(cfg: Config) -> None:
    """Once per run, before any worker starts: the tokenizer (trained on the manifest's
    captions or copied from the pretrained source) and the sample grid's prompts."""
    from collections import Counter

    from sfumato.data.ingest import MANIFEST
    from sfumato.models.text import manifest_captions, prepare_tokenizer

    t = cfg.train
    manifest = cfg.data.output_dir / MANIFEST
    prepare_tokenizer(t.text, manifest, t.output_dir)
    prompts_file = t.output_dir / SAMPLE_PROMPTS
    if prompts_file.exists():
        return
    prompts = t.sample.prompts
    if prompts is None:
        counts = Counter(manifest_captions(manifest))
        prompts = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: t.sample.num_images]]
    prompts_file.write_text(json.dumps(prompts, indent=1))


def prepare_run(cfg: Config) -> None:
    """Before any worker starts: the run folder with its resolved config, its classes, its
    tokenizer and prompts (text), the VAE checked (latent)."""
    t = cfg.train
    if t is None:
        raise ValueError("the config has no `train` section")
    t.output_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, t.output_dir / "config.yaml")
    (t.output_dir / STOPPED).unlink(missing_ok=True)
    _keep_classes(cfg)
    if t.conditioning == "text":
        _prepare_text(cfg)
    if t.vae is not None:
        _check_vae(cfg)


def make_trainer(cfg: Config, callbacks: list | None = None, **loop_options):
    """The run's TorchTrainer (Ray Train V2): one worker per data-parallel rank, gloo on CPUs and
    NCCL on GPUs, restarts up to train.max_failures. `loop_options` are the fault injections."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sfumato.console import train_log_level

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), **loop_options},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=str(t.output_dir / "ray"), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             logging_config=LoggingConfig(log_level=train_log_level())),
    )


def finish_run(cfg: Config) -> dict:
    """After the trainer: a stop on NaN/Inf becomes an error that names the last good checkpoint;
    otherwise the last metrics line."""
    from sfumato.train.step import NonFiniteError

    t = cfg.train
    stopped = t.output_dir / STOPPED
    if stopped.exists():
        raise NonFiniteError(f"training stopped: {json.loads(stopped.read_text())['error']} "
                             f"(the run folder keeps the last good checkpoint: {ckpt.latest(t.output_dir / 'checkpoints')})")
    lines = (t.output_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def run_training(cfg: Config, inject_failure_at_step: int | None = None, inject_nan_at_step: int | None = None) -> dict:
    """Train (or continue) the run in cfg.train.output_dir on Ray; returns the last metrics.
    The inject_* arguments are fault injection for tests: the last rank's process dies, or its
    weights turn NaN, at that optimizer step (once per run folder)."""
    from sfumato.runtime import init_ray

    prepare_run(cfg)
    init_ray(cfg.ray, dashboard=True)  # its state API lets Ray Train watch and clean up its controller
    t = cfg.train
    for stage in t.stages:
        log.info("stage %dpx: %d steps, effective batch %d = micro %d x accum %d x workers %d",
                 stage.resolution_px, stage.steps, t.effective_batch(stage), stage.micro_batch_size,
                 t.grad_accum_steps, t.num_workers)
    make_trainer(cfg, inject_failure_at_step=inject_failure_at_step, inject_nan_at_step=inject_nan_at_step).fit()
    return finish_run(cfg)

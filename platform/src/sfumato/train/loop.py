"""Ray Train (V2 `TorchTrainer`) + DeepSpeed around the plain `train_step`: the driver side.

`run_training` prepares the run folder (resolved config, classes, tokenizer, VAE check), starts
one worker per data-parallel rank, and maps a stop on NaN/Inf to an error that Ray does not
retry. What each worker does is `sfumato.train.worker`; `train_loop_per_worker` only adapts Ray
to it.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from sfumato import checkpoint as ckpt
from sfumato.config import Config, validate_config, write_resolved
from sfumato.layout import DataFolder, RunFolder, atomic_write, atomic_write_json, read_metrics

log = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict) -> None:
    """What Ray Train runs on every rank: the config and hooks in, the worker's loop run
    (sfumato.train.worker: setup, resume, stages, optimizer steps)."""
    cfg = validate_config(loop_config["config"], inputs=False)
    _quiet_worker(cfg.train)  # before DeepSpeed's import: it picks its accelerator then

    import ray.train

    from sfumato.train.checkpointing import resume
    from sfumato.train.worker import setup, train

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    worker = setup(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, loop_config.get("hooks") or [])
    resume(worker)
    train(worker)


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


def _check_vae(cfg: Config) -> None:
    """Before any worker starts: the VAE's config is readable and every stage's resolution
    divides into latents."""
    from diffusers import AutoencoderKL

    vae = cfg.train.vae
    try:
        vae_config = AutoencoderKL.load_config(vae.pretrained, subfolder=vae.subfolder)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"train.vae.pretrained={vae.pretrained!r} (subfolder {vae.subfolder!r}) has no "
            f"readable AutoencoderKL config: {err}"
        ) from None
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    for i, stage in enumerate(cfg.train.stages):
        if stage.resolution_px % factor:
            raise ValueError(
                f"train.stages.{i}.resolution_px={stage.resolution_px} is not a multiple of the "
                f"VAE's downsampling factor {factor}"
            )


def _keep_classes(cfg: Config) -> None:
    """The run keeps the class index -> name map it trains with (evaluation and export read it),
    taken from the shards at its first start."""
    target = RunFolder(cfg.train.output_dir).classes
    if not target.exists():
        source = DataFolder(cfg.data.output_dir).shard_folder.classes
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist: run `sfumato shards` before training")
        atomic_write(target, source.read_text())


def _prepare_text(cfg: Config) -> None:
    """Once per run, before any worker starts: the tokenizer (trained on the manifest's
    captions or copied from the pretrained source) and the sample grid's prompts."""
    from collections import Counter

    from sfumato.models.text import check_encoder, manifest_captions, prepare_tokenizer

    t = cfg.train
    if t.text.pretrained:  # here, not in every worker: a T5 folder with encoder: clip fails before Ray starts
        check_encoder(t.text)
    manifest = DataFolder(cfg.data.output_dir).manifest
    prepare_tokenizer(t.text, manifest, t.output_dir)
    prompts_file = RunFolder(t.output_dir).sample_prompts
    if prompts_file.exists():
        return
    prompts = t.sample.prompts
    if prompts is None:
        counts = Counter(manifest_captions(manifest))
        prompts = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: t.sample.num_images]]
    atomic_write_json(prompts_file, prompts)


def prepare_run(cfg: Config) -> None:
    """Before any worker starts: the run folder with its resolved config, its classes, its
    tokenizer and prompts (text), the VAE checked (latent); a fine-tune's selection."""
    t = cfg.train
    if t is None:
        raise ValueError("the config has no `train` section")
    t.output_dir.mkdir(parents=True, exist_ok=True)
    run = RunFolder(t.output_dir)
    write_resolved(cfg, run.config)
    run.stopped.unlink(missing_ok=True)
    if t.lineage is not None:  # a fine-tune: its selected ids, the parent's classes
        from sfumato.train.finetune import prepare

        prepare(cfg)
    _keep_classes(cfg)
    if t.conditioning == "text":
        _prepare_text(cfg)
    if t.vae is not None:
        _check_vae(cfg)
    if t.quality is not None:  # its yardstick trained here once, not in a worker's time
        from sfumato.train import quality

        quality.prepare(cfg)


def make_trainer(cfg: Config, callbacks: list | None = None, hooks: list | None = None):
    """The run's TorchTrainer (Ray Train V2): one worker per data-parallel rank, gloo on CPUs and
    NCCL on GPUs, restarts up to train.max_failures. `hooks`: sfumato.train.faults.Hooks the
    worker loop calls around every optimizer step (tests inject faults with them)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sfumato.console import train_log_level

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "hooks": list(hooks or [])},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(RunFolder(t.output_dir).ray_storage),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )


def finish_run(cfg: Config) -> dict:
    """After the trainer: a stop on NaN/Inf (or a loss spike, train.spike_guard) becomes an error
    that names the last good checkpoint; otherwise the last metrics line."""
    from sfumato.train.spike import LossSpikeError
    from sfumato.train.step import NonFiniteError

    run = RunFolder(cfg.train.output_dir)
    if run.stopped.exists():
        stopped = json.loads(run.stopped.read_text())
        error = LossSpikeError if stopped.get("kind") == "loss_spike" else NonFiniteError
        raise error(
            f"training stopped: {stopped['error']} "
            f"(the run folder keeps the last good checkpoint: {ckpt.latest(run.checkpoints)})"
        )
    records = read_metrics(run.metrics)
    return records[-1] if records else {}


def run_training(cfg: Config, hooks: list | None = None) -> dict:
    """Train (or continue) the run in cfg.train.output_dir on Ray; returns the last metrics.
    `hooks`: see make_trainer (sfumato.train.faults)."""
    from sfumato.runtime import init_ray

    prepare_run(cfg)
    init_ray(cfg.ray, dashboard=True)  # its state API lets Ray Train watch and clean up its controller
    t = cfg.train
    for stage in t.stages:
        log.info(
            "stage %dpx: %d steps, effective batch %d = micro %d x accum %d x workers %d",
            stage.resolution_px,
            stage.steps,
            t.effective_batch(stage),
            stage.micro_batch_size,
            t.grad_accum_steps,
            t.num_workers,
        )
    make_trainer(cfg, hooks=hooks).fit()
    return finish_run(cfg)

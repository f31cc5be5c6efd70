"""`sfumato bench train`: samples/s of the full training step through Ray Train + DeepSpeed
against a plain single-process PyTorch + diffusers loop with the same model, global batch and
precision, in one run; and what the shard loader alone delivers.

Both sides train on the same demo shards. The plain loop uses every CPU thread in one process;
the Ray run splits the global batch over `--workers` data-parallel processes of one thread each.
Each side's first log window (start-up, first-step allocations) is left out of its rate.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from sfumato.config import Config
from sfumato.layout import DataFolder, RunFolder, read_jsonl


def bench_config(tmp: Path, args) -> Config:
    window = max(1, args.steps // 4)
    return Config.model_validate({
        "name": "bench-train",
        "ray": {"num_cpus": args.workers},
        "data": {
            "output_dir": str(tmp / "data"),
            "sources": [{"kind": "demo", "name": "demo", "num_images": 512, "image_size_px": 48}],
            "ingest": {"license_allowlist": ["CC0-1.0"], "min_side_px": 32},
            "shards": {"resolutions_px": [args.resolution], "samples_per_shard": 64},
        },
        "train": {
            "output_dir": str(tmp / "run"), "model": args.model, "num_workers": args.workers,
            "zero_stage": 2, "precision": "fp32", "wandb": False,
            "stages": [{"resolution_px": args.resolution, "steps": args.steps, "micro_batch_size": args.micro_batch}],
            "log_every_steps": window, "sample_every_steps": 10**9, "checkpoint_every_steps": 10**9,
            "sample": {"num_images": 4, "steps": 2},
        },
    })


def plain_loop(cfg: Config, steps: int, warmup: int) -> float:
    """Single process: the same model, loss and AdamW, the global batch in one forward."""
    from sfumato.data.loader import iter_training_batches, shard_paths
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.registry import build_denoiser
    from sfumato.train.step import PlainEngine, TrainState, train_step

    t, stage = cfg.train, cfg.train.stages[0]
    shards = DataFolder(cfg.data.output_dir).shard_folder
    classes = len(json.loads(shards.classes.read_text()))
    torch.manual_seed(cfg.seed)
    model = build_denoiser(t.model, stage.resolution_px, 3, classes)
    state = TrainState(engine=PlainEngine(model, t.optimizer, grad_clip_norm=t.grad_clip_norm),
                       schedule=NoiseSchedule.from_config(cfg.diffusion), diffusion_cfg=cfg.diffusion,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), null_class=classes)
    global_batch = stage.micro_batch_size * t.num_workers
    batches = iter_training_batches(shard_paths(shards.root, stage.resolution_px),
                                    global_batch, stage.resolution_px, 0, 1, cfg.seed)
    for _ in range(warmup):
        train_step(state, next(batches)[0])
    start = time.perf_counter()
    for _ in range(steps - warmup):
        train_step(state, next(batches)[0])
    return (steps - warmup) * global_batch / (time.perf_counter() - start)


def loader_alone(cfg: Config, batches_wanted: int = 50) -> float:
    from sfumato.data.loader import iter_training_batches, shard_paths

    stage = cfg.train.stages[0]
    batches = iter_training_batches(shard_paths(DataFolder(cfg.data.output_dir).shards, stage.resolution_px),
                                    stage.micro_batch_size, stage.resolution_px, 0, 1, cfg.seed)
    start = time.perf_counter()
    for _ in range(batches_wanted):
        next(batches)
    return batches_wanted * stage.micro_batch_size / (time.perf_counter() - start)


def main(args) -> dict:
    if args.gpu:
        result = gpu_step(args.model, args.resolution, args.micro_batch, args.zero_stage, "bf16", steps=args.steps)
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return result
    from sfumato.bench.ingest import machine
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards
    from sfumato.train.loop import run_training

    with tempfile.TemporaryDirectory(prefix="sfumato-bench-train-") as tmp:
        cfg = bench_config(Path(tmp), args)
        run_ingest(cfg)
        run_shards(cfg)
        run_training(cfg)
        windows = read_jsonl(RunFolder(cfg.train.output_dir).metrics)
        ray_rate = sum(w["samples_per_s"] for w in windows[1:]) / max(1, len(windows) - 1)
        plain_rate = plain_loop(cfg, args.steps, warmup=max(1, args.steps // 4))
        loader_rate = loader_alone(cfg)
    result = {
        "machine": machine(), "model": args.model, "resolution_px": args.resolution, "workers": args.workers,
        "global_batch": args.micro_batch * args.workers, "precision": "fp32", "zero_stage": 2,
        "ray_deepspeed_samples_per_s": round(ray_rate, 1), "plain_pytorch_samples_per_s": round(plain_rate, 1),
        "ratio": round(ray_rate / plain_rate, 3), "loader_samples_per_s": round(loader_rate, 1),
        "loader_over_step": round(loader_rate / ray_rate, 1),
    }
    print(f"\ntrain step, {args.model} at {args.resolution}px, global batch {result['global_batch']}, fp32")
    print(f"  Ray Train + DeepSpeed ZeRO-2, {args.workers} workers: {result['ray_deepspeed_samples_per_s']} samples/s")
    print(f"  plain PyTorch, 1 process:             {result['plain_pytorch_samples_per_s']} samples/s")
    print(f"  ratio {result['ratio']}; loader alone {result['loader_samples_per_s']} samples/s "
          f"({result['loader_over_step']}x what the step consumes)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


PEAK_BF16_TFLOPS = 989.0  # dense bf16 of an H100/H200 SXM, the datasheet figure MFU is quoted against


def gpu_step(model_name: str, resolution_px: int, micro_batch: int, zero_stage: int, precision: str,
             steps: int = 30, warmup: int = 10) -> dict:
    """One process, one GPU: the DeepSpeed engine the Ray workers build, around the same
    `train_step`, on synthetic uint8 images (the step, not the loader, is measured). Reports
    samples/s, peak memory and model FLOPs utilisation against the GPU's dense bf16 peak."""
    import os

    import deepspeed
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.registry import build_denoiser, parameter_count
    from sfumato.train.worker import deepspeed_config
    from sfumato.train.step import GradientWatch, TrainState, train_step

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_denoiser(model_name, resolution_px, 3, num_classes=10)
    params = parameter_count(model)
    cfg = Config.model_validate({
        "name": "gpu", "data": {"output_dir": "/tmp/unused", "sources": [{"kind": "demo", "name": "d"}],
                                "ingest": {"license_allowlist": ["CC0-1.0"]}, "shards": {"resolutions_px": [resolution_px]}},
        "train": {"output_dir": "/tmp/unused-run", "model": model_name, "num_workers": 1, "use_gpu": True,
                  "precision": precision, "zero_stage": zero_stage, "wandb": False,
                  "stages": [{"resolution_px": resolution_px, "steps": steps, "micro_batch_size": micro_batch}]},
    })
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                           config=deepspeed_config(cfg, micro_batch))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    diffusion = DiffusionConfig()
    state = TrainState(engine=engine, schedule=NoiseSchedule.from_config(diffusion), diffusion_cfg=diffusion,
                       generator=torch.Generator(device).manual_seed(0), device=device, dtype=dtype, null_class=10,
                       watch=GradientWatch(engine.module))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (micro_batch, resolution_px, resolution_px, 3), dtype=np.uint8),
             "class": rng.integers(0, 10, micro_batch), "id": [str(i) for i in range(micro_batch)]}
    # Model FLOPs of one sample's forward, counted by PyTorch; training = 3x forward.
    with FlopCounterMode(display=False) as counter:
        x = torch.randn(1, 3, resolution_px, resolution_px, device=device, dtype=dtype)
        with torch.no_grad():
            engine.module(x, torch.tensor([10], device=device), torch.tensor([0], device=device))
    flops_per_sample = 3 * counter.get_total_flops()
    for _ in range(warmup):
        train_step(state, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    samples_per_s = steps * micro_batch / seconds
    return {"model": model_name, "params_m": round(params / 1e6, 1), "resolution_px": resolution_px,
            "micro_batch": micro_batch, "zero_stage": zero_stage, "precision": precision,
            "samples_per_s": round(samples_per_s, 1), "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "mfu": round(samples_per_s * flops_per_sample / (PEAK_BF16_TFLOPS * 1e12), 3),
            "gpu": torch.cuda.get_device_name()}

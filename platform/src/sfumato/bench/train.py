"""`sfumato bench train`: samples/s of the full training step through Ray Train + DeepSpeed
against a plain single-process PyTorch + diffusers loop with the same model, global batch and
precision, in one run; and what the shard loader alone delivers.

Both sides train on the same demo shards. The plain loop is what a user writes by hand: one
process using every CPU thread, torch's default AdamW, no EMA. The Ray side runs once per
layout of the same CPUs (`--layouts`, workers x threads: 2x1 = two data-parallel workers of one
thread each, the global batch split between them; 1x2 = one worker with both threads), with
everything the platform does per step (EMA, finite checks, logging, the shard loader).
Each side's first log window (start-up, first-step allocations) is left out of its rate.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from sfumato.bench import add_out_argument
from sfumato.config import Config
from sfumato.layout import DataFolder, RunFolder
from sfumato.records import SAMPLES_PER_S, read_metric_lines


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """ "2x1,1x2" -> [(2, 1), (1, 2)]: (workers, threads per worker)."""
    try:
        layouts = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        layouts = []
    if not layouts or any(len(lay) != 2 or min(lay) < 1 for lay in layouts):
        raise ValueError(f"--layouts {text!r}: expected workers x threads pairs such as 2x1,1x2")
    return layouts


def bench_config(tmp: Path, args, workers: int | None = None, threads: int = 1) -> Config:
    """The run of one layout; the global batch (`--micro-batch` x `--workers`) is the same in
    every layout, split over its workers."""
    window = max(1, args.steps // 4)
    workers = workers or args.workers
    global_batch = args.micro_batch * args.workers
    if global_batch % workers:
        raise ValueError(f"the global batch {global_batch} does not split over {workers} workers")
    return Config.model_validate(
        {
            "name": "bench-train",
            "ray": {"num_cpus": workers * threads},
            "data": {
                "output_dir": str(tmp / "data"),
                "sources": [{"kind": "demo", "name": "demo", "num_images": 512, "image_size_px": 48}],
                "ingest": {"license_allowlist": ["CC0-1.0"], "min_side_px": 32},
                "shards": {"resolutions_px": [args.resolution], "samples_per_shard": 64},
            },
            "train": {
                "output_dir": str(tmp / f"run-{workers}x{threads}"),
                "model": args.model,
                "num_workers": workers,
                "cpus_per_worker": threads,
                "zero_stage": args.zero_stage,
                "precision": "fp32",
                "wandb": False,
                "stages": [
                    {"resolution_px": args.resolution, "steps": args.steps, "micro_batch_size": global_batch // workers}
                ],
                "log_every_steps": window,
                "sample_every_steps": 10**9,
                "checkpoint_every_steps": 10**9,
                "sample": {"num_images": 4, "steps": 2},
            },
        }
    )


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
    state = TrainState(
        engine=PlainEngine(model, t.optimizer, grad_clip_norm=t.grad_clip_norm),
        schedule=NoiseSchedule.from_config(cfg.diffusion),
        diffusion_cfg=cfg.diffusion,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        null_class=classes,
    )
    global_batch = stage.micro_batch_size * t.num_workers
    batches = iter_training_batches(
        shard_paths(shards.root, stage.resolution_px), global_batch, stage.resolution_px, 0, 1, cfg.seed
    )
    for _ in range(warmup):
        train_step(state, next(batches)[0])
    start = time.perf_counter()
    for _ in range(steps - warmup):
        train_step(state, next(batches)[0])
    return (steps - warmup) * global_batch / (time.perf_counter() - start)


def loader_alone(cfg: Config, batches_wanted: int = 50) -> float:
    from sfumato.data.loader import iter_training_batches, shard_paths

    stage = cfg.train.stages[0]
    batches = iter_training_batches(
        shard_paths(DataFolder(cfg.data.output_dir).shards, stage.resolution_px),
        stage.micro_batch_size,
        stage.resolution_px,
        0,
        1,
        cfg.seed,
    )
    start = time.perf_counter()
    for _ in range(batches_wanted):
        next(batches)
    return batches_wanted * stage.micro_batch_size / (time.perf_counter() - start)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="unet-s", help="a registered model")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side (--gpu: timed steps)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray Train workers; with --micro-batch, the global batch every layout splits",
    )
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per worker per step at --workers workers")
    parser.add_argument("--layouts", default="2x1,1x2", help="Ray layouts of the CPUs, workers x threads each")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument(
        "--gpu", action="store_true", help="time the DeepSpeed step alone on one GPU (bf16, synthetic batch) with MFU"
    )
    parser.add_argument("--compile", action="store_true", help="--gpu: train.compile on (torch.compile)")
    parser.add_argument(
        "--gpu-matrix",
        action="store_true",
        help="every preset x ZeRO 0/2/3 (+ compiled rows) on one GPU, one process per row",
    )
    add_out_argument(parser)


def run(args) -> dict:
    if args.gpu_matrix:
        return gpu_matrix(args)
    if args.gpu:
        result = gpu_step(
            args.model,
            args.resolution,
            args.micro_batch,
            args.zero_stage,
            "bf16",
            steps=args.steps,
            compile=args.compile,
        )
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return result
    from sfumato.bench.ingest import machine
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards
    from sfumato.train.loop import run_training

    layouts = parse_layouts(args.layouts)
    ray_rates = {}
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-train-") as tmp:
        cfg = bench_config(Path(tmp), args)
        run_ingest(cfg)
        run_shards(cfg)
        for workers, threads in layouts:
            layout_cfg = bench_config(Path(tmp), args, workers, threads)
            run_training(layout_cfg)
            windows = read_metric_lines(RunFolder(layout_cfg.train.output_dir).metrics)
            rates = [w.value(SAMPLES_PER_S) for w in windows[1:]]
            ray_rates[f"{workers}x{threads}"] = sum(rates) / max(1, len(rates))
        plain_rate = plain_loop(cfg, args.steps, warmup=max(1, args.steps // 4))
        loader_rate = loader_alone(cfg)
    best = max(ray_rates, key=ray_rates.get)
    result = {
        "machine": machine(),
        "model": args.model,
        "resolution_px": args.resolution,
        "global_batch": args.micro_batch * args.workers,
        "precision": "fp32",
        "zero_stage": args.zero_stage,
        "ray_deepspeed_samples_per_s": {k: round(v, 1) for k, v in ray_rates.items()},
        "plain_pytorch_samples_per_s": round(plain_rate, 1),
        "ratio": {k: round(v / plain_rate, 3) for k, v in ray_rates.items()},
        "fastest_layout": best,
        "loader_samples_per_s": round(loader_rate, 1),
        "loader_over_step": round(loader_rate / ray_rates[best], 1),
    }
    print(
        f"\ntrain step, {args.model} at {args.resolution}px, global batch {result['global_batch']}, fp32, "
        f"ZeRO-{args.zero_stage}"
    )
    for layout, rate in result["ray_deepspeed_samples_per_s"].items():
        workers, threads = layout.split("x")
        print(
            f"  Ray Train + DeepSpeed, {workers} worker(s) x {threads} thread(s): {rate} samples/s, "
            f"ratio {result['ratio'][layout]}"
        )
    print(f"  plain PyTorch, 1 process:             {result['plain_pytorch_samples_per_s']} samples/s")
    print(
        f"  fastest layout {best}; loader alone {result['loader_samples_per_s']} samples/s "
        f"({result['loader_over_step']}x what the step consumes)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


PEAK_BF16_TFLOPS = 989.0  # dense bf16 of an H100/H200 SXM, the datasheet figure MFU is quoted against


# The GPU matrix: every preset at a micro-batch that fills an 80 GB GPU, ZeRO 0/2/3, eager, and
# the largest presets compiled (train.compile) for the before/after row.
GPU_MATRIX = [
    (model, px, batch, zero, False)
    for model, px, batch in [
        ("unet-s", 64, 128),
        ("unet-b", 64, 64),
        ("unet-l", 64, 32),
        ("dit-s", 32, 256),
        ("dit-b", 32, 256),
        ("dit-l", 32, 256),
    ]
    for zero in (0, 2, 3)
]
GPU_MATRIX += [("unet-l", 64, 32, 2, True), ("dit-l", 32, 256, 2, True)]


def gpu_matrix(args) -> list[dict]:
    """`sfumato bench train --gpu-matrix`: one process per row (a fresh CUDA context and
    DeepSpeed group each; a row that runs out of memory is recorded, not fatal), the rows as
    JSON lines in --out and a table on the console: the one prepared script for a lent GPU."""
    import subprocess
    import sys

    rows = []
    for model, px, batch, zero, compiled in GPU_MATRIX:
        cmd = [
            sys.executable,
            "-m",
            "sfumato.cli",
            "bench",
            "train",
            "--gpu",
            "--model",
            model,
            "--resolution",
            str(px),
            "--micro-batch",
            str(batch),
            "--zero-stage",
            str(zero),
            "--steps",
            str(args.steps),
            *(["--compile"] if compiled else []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = (
            json.loads(lines[-1])
            if done.returncode == 0 and lines
            else {
                "model": model,
                "resolution_px": px,
                "micro_batch": batch,
                "zero_stage": zero,
                "compile": compiled,
                "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300],
            }
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def gpu_step(
    model_name: str,
    resolution_px: int,
    micro_batch: int,
    zero_stage: int,
    precision: str,
    steps: int = 30,
    warmup: int = 10,
    compile: bool = False,
) -> dict:
    """One process, one GPU: the DeepSpeed engine the Ray workers build, around the same
    `train_step`, on synthetic uint8 images (the step, not the loader, is measured). Reports
    samples/s, peak memory and model FLOPs utilisation against the GPU's dense bf16 peak.
    `compile`: train.compile and train.channels_last as the workers apply them (speed_up)."""
    import os
    from types import SimpleNamespace

    import deepspeed
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.registry import build_denoiser, parameter_count
    from sfumato.train.step import GradientWatch, TrainState, train_step
    from sfumato.train.worker import deepspeed_config, speed_up

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
    speed_up(model, SimpleNamespace(compile=compile, channels_last=None), device)
    cfg = Config.model_validate(
        {
            "name": "gpu",
            "data": {
                "output_dir": "/tmp/unused",
                "sources": [{"kind": "demo", "name": "d"}],
                "ingest": {"license_allowlist": ["CC0-1.0"]},
                "shards": {"resolutions_px": [resolution_px]},
            },
            "train": {
                "output_dir": "/tmp/unused-run",
                "model": model_name,
                "num_workers": 1,
                "use_gpu": True,
                "precision": precision,
                "zero_stage": zero_stage,
                "wandb": False,
                "stages": [{"resolution_px": resolution_px, "steps": steps, "micro_batch_size": micro_batch}],
            },
        }
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, config=deepspeed_config(cfg, micro_batch)
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    diffusion = DiffusionConfig()
    state = TrainState(
        engine=engine,
        schedule=NoiseSchedule.from_config(diffusion),
        diffusion_cfg=diffusion,
        generator=torch.Generator(device).manual_seed(0),
        device=device,
        dtype=dtype,
        null_class=10,
        watch=GradientWatch(engine.module),
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (micro_batch, resolution_px, resolution_px, 3), dtype=np.uint8),
        "class": rng.integers(0, 10, micro_batch),
        "id": [str(i) for i in range(micro_batch)],
    }
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
    return {
        "model": model_name,
        "params_m": round(params / 1e6, 1),
        "resolution_px": resolution_px,
        "micro_batch": micro_batch,
        "zero_stage": zero_stage,
        "precision": precision,
        "compile": compile,
        "samples_per_s": round(samples_per_s, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(samples_per_s * flops_per_sample / (PEAK_BF16_TFLOPS * 1e12), 3),
        "gpu": torch.cuda.get_device_name(),
    }

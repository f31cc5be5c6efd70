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
    gpu = parser.add_argument_group("one GPU (sfumato.bench.train_gpu)")
    gpu.add_argument(
        "--gpu", action="store_true", help="time the DeepSpeed step alone on one GPU (synthetic batch) with MFU"
    )
    gpu.add_argument("--compile", action="store_true", help="--gpu: train.compile on (torch.compile)")
    gpu.add_argument(
        "--latent",
        action="store_true",
        help="--gpu: train on cached latents of SD's VAE (4 channels, 1/8 the side of --resolution)",
    )
    gpu.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="--gpu: the step's precision")
    gpu.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="--gpu: cpu is a dry run on gloo (checks the path)"
    )
    gpu.add_argument(
        "--gpu-matrix",
        nargs="?",
        const="dit",
        default=None,
        choices=["dit", "zero"],
        help="one process per row: dit (default) = every DiT preset at 256 px latent, bf16, compiled, ZeRO-2; "
        "zero = the UNets under ZeRO 0/2/3",
    )
    gpu.add_argument("--models", default=None, help="--gpu-matrix: only these presets, comma-separated, in this order")
    add_out_argument(parser)


def run(args) -> dict:
    if args.gpu_matrix or args.gpu:
        from sfumato.bench.train_gpu import gpu_matrix, gpu_step

        if args.gpu_matrix:
            return gpu_matrix(args.gpu_matrix, args.models, args.steps, args.out, args.device)
        result = gpu_step(
            args.model,
            args.resolution,
            args.micro_batch,
            args.zero_stage,
            args.precision,
            steps=args.steps,
            compile=args.compile,
            latent=args.latent,
            device=args.device,
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

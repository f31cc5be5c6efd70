"""`sfumato bench cache`: the latent cache (`sfumato cache`, sfumato.models.cache) against the VAE
run inside every training step, in one run, with Stable Diffusion's VAE.

The VAE is diffusers' AutoencoderKL in Stable Diffusion's configuration (83.7 M parameters, 4
latent channels, sides 8x smaller), randomly initialised and saved as a local pretrained folder:
pretrained weights cannot be downloaded here, and the cost does not depend on their values.

1. Build: demo images -> ingest -> shards -> `run_cache` (Ray Data, an actor pool holding the
   VAE, as `sfumato cache` runs it; Ray started before the clock, as in a pipeline), in images/s,
   against the same VAE's encoder called in this process on the same images (the floor: no Ray,
   no files). The cache's bytes per image come from its own cache.json, beside the shards'.
2. Step: the same denoiser, batches and AdamW (PlainEngine), one step reading the cached
   posterior (the lookup in the safetensors files, then z = mean + std * eps) against one running
   the VAE's encoder on the images; steps interleaved, one of each per round, medians.
3. By FLOPs at 256 px (counted on the meta device): each DiT preset's training FLOPs per image
   against the encoder's, the step's share that the cache removes where it cannot be timed here.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sfumato.bench import add_out_argument, publish
from sfumato.config import Config

# Stable Diffusion 1.x-2.x's VAE (CompVis/stable-diffusion-v1-4 and stabilityai/sd-vae-ft-mse
# vae/config.json): four levels, two ResNet blocks each, 4 latent channels.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
FLOPS_PRESETS = ("dit-xs", "dit-s", "dit-b", "dit-l", "dit-xl", "dit-text-xl", "mmdit-xl")
FLOPS_RESOLUTION_PX = 256


def save_sd_vae(folder: Path, seed: int = 0) -> Path:
    """A random AutoencoderKL of SD's configuration saved as a pretrained one (folder/vae, safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder / "vae")
    return folder


def encoder_flops(resolution_px: int) -> int:
    """FLOPs of SD's VAE encoder (to the posterior) on one image, counted on the meta device."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        images = torch.zeros(1, 3, resolution_px, resolution_px)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(images)
    return counter.get_total_flops()


def latent_bytes(resolution_px: int, vae_config: dict = SD_VAE_CONFIG, dtype_bytes: int = 2) -> int:
    """The tensors the cache stores per image: the posterior's mean and std, C x h x w each."""
    side = resolution_px // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 2 * vae_config["latent_channels"] * side * side * dtype_bytes


def flops_table(resolution_px: int = FLOPS_RESOLUTION_PX, presets: tuple[str, ...] = FLOPS_PRESETS) -> list[dict]:
    """Per DiT preset: training FLOPs per image (3x the forward) beside the encoder's; `with_vae`
    is the step's FLOPs with the encoder inside over the step's alone."""
    from sfumato.bench.models import preset_row

    encoder = encoder_flops(resolution_px)
    rows = []
    for name in presets:
        train = preset_row(name, resolution_px).training_flops
        rows.append(
            {"model": name, "training_flops": train, "encoder_flops": encoder, "with_vae": (train + encoder) / train}
        )
    return rows


def bench_config(tmp: Path, args) -> Config:
    return Config.model_validate(
        {
            "name": "bench-cache",
            "ray": {"num_cpus": args.workers},
            "data": {
                "output_dir": str(tmp / "data"),
                "sources": [
                    {"kind": "demo", "name": "demo", "num_images": args.images, "image_size_px": args.resolution}
                ],
                "ingest": {"license_allowlist": ["CC0-1.0"], "min_side_px": args.resolution},
                "shards": {"resolutions_px": [args.resolution], "samples_per_shard": args.samples_per_shard},
                "cache": {"batch_size": args.micro_batch, "num_workers": args.workers},
            },
            "train": {
                "output_dir": str(tmp / "run"),
                "model": args.model,
                "vae": {"pretrained": str(tmp / "sd"), "subfolder": "vae"},
                "precision": "fp32",
                "wandb": False,
                "stages": [{"resolution_px": args.resolution, "steps": 1, "micro_batch_size": args.micro_batch}],
            },
        }
    )


def encoder_alone(codec, batches: list[dict]) -> float:
    """Images/s of the VAE's encoder in this process, on the batches' images (uint8 -> [-1, 1]),
    after one untimed batch (the first call of each convolution shape sets up its kernels)."""
    from sfumato.train.step import batch_to_tensors

    images = [batch_to_tensors(batch, torch.device("cpu"), torch.float32)[0] for batch in batches]
    codec.posterior(images[0])
    start = time.perf_counter()
    for x0 in images[1:]:
        codec.posterior(x0)
    return sum(len(x0) for x0 in images[1:]) / (time.perf_counter() - start)


class SteppedSide:
    """One side of the step race: its own denoiser (the same initial weights), codec and clock."""

    def __init__(self, cfg: Config, codec, classes: int, latent_side: int, cache=None):
        from sfumato.diffusion.schedule import NoiseSchedule
        from sfumato.models.registry import build_denoiser
        from sfumato.train.step import PlainEngine, TrainState

        torch.manual_seed(0)
        model = build_denoiser(cfg.train.model, latent_side, codec.channels, classes)
        self.cache, self.seconds = cache, []
        self.state = TrainState(
            engine=PlainEngine(model, cfg.train.optimizer),
            schedule=NoiseSchedule.from_config(cfg.diffusion),
            diffusion_cfg=cfg.diffusion,
            generator=torch.Generator().manual_seed(0),
            device=torch.device("cpu"),
            null_class=classes,
            codec=codec,
        )

    def step(self, batch: dict, timed: bool = True) -> None:
        from sfumato.train.step import train_step

        start = time.perf_counter()
        train_step(self.state, self.cache.attach(batch) if self.cache is not None else batch)
        if timed:
            self.seconds.append(time.perf_counter() - start)

    @property
    def ms_per_step(self) -> float:
        return 1000 * statistics.median(self.seconds)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="dit-b", help="the denoiser of the step race")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (the latent's is 1/8)")
    parser.add_argument("--images", type=int, default=128, help="demo images to ingest, shard and cache")
    parser.add_argument("--samples-per-shard", type=int, default=32, help="images per shard (one cache file each)")
    parser.add_argument("--micro-batch", type=int, default=32, help="images per step and per VAE forward")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (AdamW's state, caches)")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs and the cache builder's actors")
    add_out_argument(parser)


def run(args) -> dict:
    from sfumato.bench.ingest import machine
    from sfumato.data.ingest import run_ingest
    from sfumato.data.loader import iter_training_batches, shard_paths
    from sfumato.data.shards import run_shards
    from sfumato.layout import DataFolder
    from sfumato.models.cache import LatentCache, run_cache
    from sfumato.models.vae import LatentCodec
    from sfumato.runtime import init_ray

    result: dict = {"machine": machine(), "vae": "AutoencoderKL, Stable Diffusion's config, random weights"}
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-cache-") as tmp:
        tmp = Path(tmp)
        save_sd_vae(tmp / "sd")
        cfg = bench_config(tmp, args)
        run_ingest(cfg)
        run_shards(cfg)
        init_ray(cfg.ray)
        start = time.perf_counter()
        summary = run_cache(cfg)
        build_s = time.perf_counter() - start
        data = DataFolder(cfg.data.output_dir)
        shards = shard_paths(data.shards, args.resolution)
        classes = len(json.loads(data.shard_folder.classes.read_text()))
        loader = iter_training_batches(shards, args.micro_batch, args.resolution, 0, 1, cfg.seed)
        batches = [batch for batch, _ in itertools.islice(loader, args.warmup + args.rounds)]
        codec = LatentCodec.load(cfg.train.vae)
        floor = encoder_alone(codec, batches[:3])
        side = codec.latent_size(args.resolution)
        lazy = LatentCodec.load(cfg.train.vae, lazy=True)  # the cached side never loads the weights
        cached = SteppedSide(cfg, lazy, classes, side, LatentCache.open(cfg, args.resolution))
        on_the_fly = SteppedSide(cfg, codec, classes, side)
        for i, batch in enumerate(batches):  # interleaved: a neighbour's load falls on both sides
            cached.step(batch, timed=i >= args.warmup)
            on_the_fly.step(batch, timed=i >= args.warmup)
        shard_bytes = sum(p.stat().st_size for p in shards) / summary.samples
    result.update(
        {
            "resolution_px": args.resolution,
            "latent": [codec.channels, side, side],
            "cache_dtype": cfg.data.cache.dtype,
            "build": {
                "images": summary.samples,
                "files": summary.files,
                "seconds": round(build_s, 1),
                "images_per_s": round(summary.samples / build_s, 2),
                "encoder_alone_images_per_s": round(floor, 2),
                "over_encoder_alone": round(summary.samples / build_s / floor, 2),
            },
            "bytes_per_image": {
                "cache": summary.bytes_per_sample,
                "latent_tensors": latent_bytes(args.resolution),
                "shard": round(shard_bytes, 1),
                "latent_tensors_at_256px": latent_bytes(FLOPS_RESOLUTION_PX),
            },
            "step": {
                "model": args.model,
                "micro_batch": args.micro_batch,
                "rounds": args.rounds,
                "cached_ms": round(cached.ms_per_step, 1),
                "vae_in_step_ms": round(on_the_fly.ms_per_step, 1),
                "vae_in_step_over_cached": round(on_the_fly.ms_per_step / cached.ms_per_step, 2),
                "difference_ms_per_image": round((on_the_fly.ms_per_step - cached.ms_per_step) / args.micro_batch, 1),
                "encoder_alone_ms_per_image": round(1000 / floor, 1),
            },
            "flops_at_256px": flops_table(),
        }
    )
    b, s, n = result["build"], result["step"], result["bytes_per_image"]
    lines = [
        f"latent cache, SD's VAE (random weights), {args.resolution} px -> latent {result['latent']}, "
        f"{cfg.data.cache.dtype}, {torch.get_num_threads()} torch threads",
        f"  build: {b['images']} images in {b['files']} files, {b['seconds']} s = {b['images_per_s']} images/s "
        f"(the encoder alone in-process: {b['encoder_alone_images_per_s']} images/s; ratio {b['over_encoder_alone']})",
        f"  bytes per image: cache {n['cache']} (mean + std tensors {n['latent_tensors']}), shard {n['shard']}; "
        f"at 256 px the tensors are {n['latent_tensors_at_256px']}",
        f"  step ({args.model}, batch {args.micro_batch}, median of {args.rounds}): cached {s['cached_ms']:.0f} ms, "
        f"VAE in the step {s['vae_in_step_ms']:.0f} ms: {s['vae_in_step_over_cached']}x; the difference "
        f"{s['difference_ms_per_image']} ms per image, the encoder alone {s['encoder_alone_ms_per_image']}",
        "",
        f"By FLOPs at {FLOPS_RESOLUTION_PX} px (per image; the encoder: "
        f"{result['flops_at_256px'][0]['encoder_flops'] / 1e9:.1f} GFLOPs)",
        "",
        "| model | training GFLOPs / image | with the VAE in the step |",
        "|---|---:|---:|",
        *(
            f"| {r['model']} | {r['training_flops'] / 1e9:,.1f} | {r['with_vae']:.2f}x |"
            for r in result["flops_at_256px"]
        ),
    ]
    return publish(result, "\n".join(lines), args.out)

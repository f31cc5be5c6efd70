"""`sfumato bench train --gpu` and `--gpu-matrix`: the training step alone on one GPU, with MFU.

One process, one GPU: the DeepSpeed engine the Ray workers build, around the same `train_step`,
on a synthetic batch (the step, not the loader, is measured), without the EMA.

`--latent`: the batch is what the latent cache gives training (sfumato.models.cache): the
posterior's mean and std of Stable Diffusion's VAE, 4 channels at 1/8 of the side, so the
denoiser sees a 32 x 32 latent at 256 px and the VAE never runs. Text models read a frozen
encoder's cached caption states, 77 x 768 (CLIP ViT-L/14's), as `sfumato cache` stores them for
`train.text.train_encoder: false`: the encoder never runs either (a one-layer stand-in of its
width sits in the Denoiser, frozen, as a pretrained one would).

MFU = samples/s x training FLOPs per sample / the GPU's dense bf16 peak. The FLOPs are 3x the
forward's, counted on the meta device by sfumato.bench.models (the counts `sfumato bench models`
prints, equal to the DiT's closed form): the network alone (a text model's encoder does not run
in the step), whatever the device's attention kernel (the CPU's fused SDPA kernel is outside the
counter's registry and would count 0) and however ZeRO holds the weights.

`--gpu-matrix`: one process per row (a fresh CUDA context and process group each); a row that
runs out of memory is retried at half the micro-batch, and a row that fails otherwise is
recorded, not fatal. The rows go to --out as JSON lines as they finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sfumato.bench.cache import SD_VAE_CONFIG
from sfumato.bench.models import (
    CAPTION_TOKENS,
    CAPTION_WIDTH,
    CLASSES,
    LATENT_CHANNELS,
    VAE_DOWNSAMPLE,
    build_on_meta,
    forward_flops,
)
from sfumato.models.names import TEXT_MODELS

PEAK_BF16_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM, the datasheet figure MFU is quoted against
SMALLEST_RETRY_BATCH = 16


@dataclass(frozen=True)
class GpuRow:
    model: str
    resolution_px: int
    micro_batch: int
    zero_stage: int = 2
    compile: bool = True
    latent: bool = True


# The DiT presets at 256 px in SD's latent space (256 tokens), bf16, SDPA, torch.compile, ZeRO-2:
# the largest first in each family, so a short lease measures the MFU target's row first. 256 is
# the old dit-l's micro-batch at 256 tokens (68 GB eager on an H100); an out-of-memory row halves it.
MATRICES: dict[str, list[GpuRow]] = {
    "dit": [
        GpuRow(f"{family}-{size}", 256, 256)
        for family in ("dit", "dit-text", "mmdit")
        for size in ("xl", "l", "b", "s")
    ],
    # The UNets in pixel space under ZeRO 0/2/3, eager, and unet-l compiled: ZeRO's price on one GPU.
    "zero": [
        GpuRow(model, 64, batch, zero, compile=False, latent=False)
        for model, batch in (("unet-s", 128), ("unet-b", 64), ("unet-l", 32))
        for zero in (0, 2, 3)
    ]
    + [GpuRow("unet-l", 64, 32, 2, compile=True, latent=False)],
}


def shape(model_name: str, resolution_px: int, latent: bool) -> tuple[int, int]:
    """(side, channels) of what the denoiser sees: SD's latent of the image, or its pixels."""
    if latent:
        if resolution_px % VAE_DOWNSAMPLE:
            raise ValueError(f"--resolution {resolution_px} is not a multiple of the VAE's {VAE_DOWNSAMPLE}")
        return resolution_px // VAE_DOWNSAMPLE, LATENT_CHANNELS
    return resolution_px, 3


def training_flops_per_sample(model_name: str, side: int, channels: int) -> int:
    """3x the forward's FLOPs, counted on the meta device (the conditioning the batch gives)."""
    net = build_on_meta(model_name, side, channels)
    return 3 * forward_flops(net, side, channels, model_name in TEXT_MODELS)


def cached_states_encoder() -> torch.nn.Module:
    """A frozen one-layer CLIPTextModel of CLIP ViT-L's width: what the Denoiser holds for a frozen
    pretrained encoder whose states come from the cache (it never runs in the step)."""
    import transformers

    encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1000,
            hidden_size=CAPTION_WIDTH,
            intermediate_size=CAPTION_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=CAPTION_TOKENS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    return encoder.requires_grad_(False).eval()


def build_model(model_name: str, side: int, channels: int) -> torch.nn.Module:
    from sfumato.models.registry import build_denoiser

    if model_name in TEXT_MODELS:
        return build_denoiser(model_name, side, channels, text_encoder=cached_states_encoder())
    return build_denoiser(model_name, side, channels, CLASSES)


def synthetic_batch(model_name: str, resolution_px: int, micro_batch: int, latent: bool, seed: int = 0) -> dict:
    """uint8 images, class labels and ids; `latent`: a cached posterior (mean, std) in place of
    the pixels; text models: cached caption states and the empty caption's (float16, as stored)."""
    from sfumato.models.cache import LATENT_MEAN, LATENT_STD, TEXT_EMPTY, TEXT_STATES

    rng = np.random.default_rng(seed)
    batch = {"class": rng.integers(0, CLASSES, micro_batch), "id": [str(i) for i in range(micro_batch)]}
    if latent:
        side, channels = shape(model_name, resolution_px, latent)
        batch[LATENT_MEAN] = rng.standard_normal((micro_batch, channels, side, side), dtype=np.float32)
        batch[LATENT_STD] = np.full((micro_batch, channels, side, side), 0.05, dtype=np.float32)
    else:
        batch["image"] = rng.integers(0, 256, (micro_batch, resolution_px, resolution_px, 3), dtype=np.uint8)
    if model_name in TEXT_MODELS:
        batch[TEXT_STATES] = rng.standard_normal((micro_batch, CAPTION_TOKENS, CAPTION_WIDTH)).astype(np.float16)
        batch[TEXT_EMPTY] = rng.standard_normal((1, CAPTION_TOKENS, CAPTION_WIDTH)).astype(np.float16)
    return batch


def step_state(engine, model_name: str, device: torch.device, dtype: torch.dtype, latent: bool):
    """The TrainState the workers build, for this batch: SD's scaling for cached latents (a codec
    with the VAE's config and no weights), the null class or the cached states' path."""
    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.models.vae import LatentCodec
    from sfumato.train.step import GradientWatch, TrainState

    diffusion = DiffusionConfig()
    text = model_name in TEXT_MODELS
    return TrainState(
        engine=engine,
        schedule=NoiseSchedule.from_config(diffusion),
        diffusion_cfg=diffusion,
        generator=torch.Generator(device).manual_seed(0),
        device=device,
        dtype=dtype,
        null_class=None if text else CLASSES,
        # Any tokenizer marks a text run; with cached states in the batch it is never called.
        tokenizer="cached caption states" if text else None,
        codec=LatentCodec(None, SD_VAE_CONFIG["scaling_factor"], 0.0, config=SD_VAE_CONFIG) if latent else None,
        watch=GradientWatch(engine.module),
    )


def deepspeed_settings(model_name: str, resolution_px: int, micro_batch: int, zero_stage: int, precision: str) -> dict:
    """The DeepSpeed config the workers build for a run of these settings."""
    from sfumato.config import Config
    from sfumato.train.worker import deepspeed_config

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
                "conditioning": "text" if model_name in TEXT_MODELS else "class",
                "num_workers": 1,
                "use_gpu": True,
                "precision": precision,
                "zero_stage": zero_stage,
                "wandb": False,
                "stages": [{"resolution_px": resolution_px, "steps": 1, "micro_batch_size": micro_batch}],
            },
        }
    )
    return deepspeed_config(cfg, micro_batch)


def gpu_step(
    model_name: str,
    resolution_px: int,
    micro_batch: int,
    zero_stage: int,
    precision: str = "bf16",
    steps: int = 30,
    warmup: int = 10,
    compile: bool = False,
    latent: bool = False,
    device: str = "cuda",
) -> dict:
    """samples/s, peak memory and MFU of the step. `compile`: train.compile and
    train.channels_last as the workers apply them (speed_up). `device="cpu"`: a dry run on gloo
    that checks the path runs (its figures mean nothing)."""
    from types import SimpleNamespace

    import deepspeed

    from sfumato.models.registry import parameter_count
    from sfumato.train.step import train_step
    from sfumato.train.worker import speed_up

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("LOCAL_RANK", "0")
    on_gpu = device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    side, channels = shape(model_name, resolution_px, latent)
    flops_per_sample = training_flops_per_sample(model_name, side, channels)
    torch.manual_seed(0)
    model = build_model(model_name, side, channels)
    params = parameter_count(model.net)
    speed_up(model, SimpleNamespace(compile=compile, channels_last=None), torch.device(device))
    trainable = [p for p in model.parameters() if p.requires_grad]  # as the workers: frozen ones hold no state
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device),
        optimizer=optimizer,
        config=deepspeed_settings(model_name, resolution_px, micro_batch, zero_stage, precision),
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    state = step_state(engine, model_name, torch.device(device), dtype, latent)
    batch = synthetic_batch(model_name, resolution_px, micro_batch, latent)
    for _ in range(warmup):
        train_step(state, batch)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, batch)
    if on_gpu:
        torch.cuda.synchronize()
    samples_per_s = steps * micro_batch / (time.perf_counter() - start)
    return {
        "model": model_name,
        "params_m": round(params / 1e6, 1),
        "resolution_px": resolution_px,
        "latent": latent,
        "denoiser_input": [channels, side, side],
        "micro_batch": micro_batch,
        "zero_stage": zero_stage,
        "precision": precision,
        "compile": compile,
        "samples_per_s": round(samples_per_s, 1),
        "training_gflops_per_sample": round(flops_per_sample / 1e9, 2),
        "achieved_tflops": round(samples_per_s * flops_per_sample / 1e12, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "mfu": round(samples_per_s * flops_per_sample / (PEAK_BF16_TFLOPS * 1e12), 3),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu (dry run: the figures mean nothing)",
    }


# ------------------------------------------------------------------------------ the matrix
def row_command(row: GpuRow, steps: int, device: str = "cuda") -> list[str]:
    return [
        sys.executable,
        "-m",
        "sfumato.cli",
        "bench",
        "train",
        "--gpu",
        "--model",
        row.model,
        "--resolution",
        str(row.resolution_px),
        "--micro-batch",
        str(row.micro_batch),
        "--zero-stage",
        str(row.zero_stage),
        "--steps",
        str(steps),
        "--device",
        device,
        *(["--compile"] if row.compile else []),
        *(["--latent"] if row.latent else []),
    ]


def run_row(row: GpuRow, steps: int, device: str = "cuda") -> dict:
    """One row in its own process; out of memory: again at half the micro-batch."""
    tried = []
    while True:
        tried.append(row.micro_batch)
        done = subprocess.run(row_command(row, steps, device), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            return {**json.loads(lines[-1]), "micro_batches_tried": tried}
        error = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if "out of memory" not in done.stderr.lower() or row.micro_batch // 2 < SMALLEST_RETRY_BATCH:
            return {**asdict(row), "micro_batches_tried": tried, "error": error}
        row = GpuRow(**{**asdict(row), "micro_batch": row.micro_batch // 2})


def select(matrix: str, models: str | None) -> list[GpuRow]:
    """The matrix's rows, or those of the comma-separated `models` in the order given."""
    rows = MATRICES[matrix]
    if not models:
        return rows
    wanted = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {r.model for r in rows})
    if unknown:
        raise SystemExit(f"--models {unknown} are not in the {matrix!r} matrix: {sorted({r.model for r in rows})}")
    return [r for name in wanted for r in rows if r.model == name]


def gpu_matrix(matrix: str, models: str | None, steps: int, out: str | None, device: str = "cuda") -> list[dict]:
    rows = []
    for row in select(matrix, models):
        rows.append(run_row(row, steps, device))
        print(json.dumps(rows[-1]), flush=True)
        if out:
            Path(out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows

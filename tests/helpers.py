"""What tests import: the repository's paths, its real-image fixtures, configs for tests, tiny
pretrained stand-ins, real-image batches. Fixtures live in conftest.py (unit) and
smoke/conftest.py (Ray, trained runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

# The start of a fresh interpreter (`python -I`: no PYTHONPATH, no cwd) in which `import sfumato`
# fails: no sys.path entry holds the package (the editable install's .pth puts its source there),
# and sys.modules blocks it besides, so any import of it, however deep, raises. What a user of an
# export has: torch and diffusers.
NO_SFUMATO = (
    "import os, sys; sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'sfumato'))]; "
    "sys.modules['sfumato'] = None"
)


def fixture_images(name: str, classes: int, per_class: int) -> Path:
    """tests/fixtures/<name>: `classes` class folders of `per_class` real JPEGs each, used in place
    (a test that changes a file copies the folder to its tmp_path first). A missing or short set
    fails, never skips: the images are part of the repository (tests/fixtures/README.md)."""
    folder = FIXTURES / name
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in folder.iterdir() if d.is_dir()} if folder.is_dir() else {}
    if len(counts) != classes or set(counts.values()) != {per_class}:
        pytest.fail(
            f"{folder}: expected {classes} class folders of {per_class} JPEGs each, found {counts or 'none'}. "
            "These images are part of the repository: restore them from git (tests/fixtures/README.md says "
            "how they were cut).",
            pytrace=False,
        )
    return folder


def debug_config(tmp_path: Path, sources: list[dict], *overrides: str):
    """configs/debug.yaml with the test's sources and output folder."""
    from sfumato.config import load_config

    return load_config(
        REPO / "configs" / "debug.yaml",
        [
            f"data.output_dir={tmp_path / 'data'}",
            f"data.sources={yaml.safe_dump(sources, default_flow_style=True).strip()}",
            *overrides,
        ],
    )


def save_tiny_vae(folder: Path):
    """A tiny random AutoencoderKL of the real class, saved as a pretrained one (folder/vae, safetensors)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
    )
    vae.save_pretrained(folder / "vae")
    return vae


def save_tiny_dinov2(folder: Path, layers: int = 1) -> Path:
    """A tiny random DINOv2 (transformers' Dinov2Model, 4 px patches, width 32) saved as a
    pretrained image encoder would be: REPA's encoder in tests."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=4,
        image_size=32,
    )
    Dinov2Model(config).save_pretrained(folder)
    return folder


def plain_state(model, lr: float = 2e-3, condition_dropout: float = 0.1, **state_fields):
    """A TrainState around `model` without Ray or DeepSpeed (PlainEngine: AdamW, clipping at 1),
    seeded, on the CPU: what the unit tests call `train_step` with."""
    import torch

    from sfumato.config import DiffusionConfig, OptimizerConfig
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.train.step import GradientWatch, PlainEngine, TrainState

    cfg = DiffusionConfig(condition_dropout=condition_dropout)
    return TrainState(
        engine=PlainEngine(model, OptimizerConfig(lr=lr), grad_clip_norm=1.0),
        schedule=NoiseSchedule.from_config(cfg),
        diffusion_cfg=cfg,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        watch=GradientWatch(model),
        **state_fields,
    )


# Quality watched during training at a tiny size: every 2 steps (the logged ones), 8 samples of 2 steps.
WATCH = "train.quality={every_steps: 2, num_samples: 8, steps: 2, batch_size: 8}"


def run_config(tmp: Path, run: str, *overrides: str):
    """configs/debug.yaml on the CIFAR shards in `tmp`, with its run folder at tmp/run."""
    sources = [{"kind": "folder", "name": "cifar", "path": "/", "license": "research-only"}]
    return debug_config(tmp, sources, f"train.output_dir={tmp / run}", *overrides)


def cifar_batch(cifar_dir: Path, start: int, stop: int, classes: list[str] | None = None, size_px: int = 16) -> dict:
    """Real CIFAR-10 images `start:stop` (sorted paths) as a training micro-batch: uint8 images
    at `size_px`, class indices into `classes` (-1: none, also when `classes` is None), captions
    'a photo of a <class>', ids."""
    from PIL import Image

    paths = sorted(cifar_dir.rglob("*.jpg"))[start:stop]
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size_px, size_px))) for p in paths])
    labels = [classes.index(p.parent.name) if classes and p.parent.name in classes else -1 for p in paths]
    captions = [f"a photo of a {p.parent.name.replace('_', ' ')}" for p in paths]
    return {"image": images, "class": np.array(labels), "caption": captions, "id": [str(p) for p in paths]}


def caption_shard(path: Path, cifar_dir: Path, count: int = 12, size_px: int = 16) -> list[str]:
    """A shard tar of `count` real CIFAR-10 images (every fifth, at `size_px`) captioned 'a photo
    of a <class>', ids s0, s1, ...: what `sfumato shards` writes, for the cache's builder without
    Ray. Returns the captions in order."""
    import io
    import json
    import tarfile

    from PIL import Image

    from sfumato.data.shards import tar_add

    paths = sorted(cifar_dir.rglob("*.jpg"))[::5][:count]
    captions = [f"a photo of a {p.parent.name}" for p in paths]
    with tarfile.open(path, "w") as tar:
        for key, (image, caption) in enumerate(zip(paths, captions)):
            png = io.BytesIO()
            Image.open(image).convert("RGB").resize((size_px, size_px)).save(png, "PNG")
            tar_add(tar, f"{key:09d}.png", png.getvalue())
            tar_add(tar, f"{key:09d}.json", json.dumps({"id": f"s{key}", "caption": caption}).encode())
    return captions


def cache_row(shard: Path, resolution_px: int = 16, dtype: str = "float32") -> dict:
    """The row the cache stage hands its builder (CacheEncoder) for one shard."""
    return {
        "resolution_px": resolution_px,
        "index": 0,
        "shard": str(shard),
        "sha256": "abc",
        "shard_name": shard.name,
        "dtype": dtype,
    }


def exported(run_cfg) -> Path:
    """The run's export folder (diffusers + ONNX), exported once and reused by every test module."""
    from sfumato.export.export_run import run_export

    export = run_cfg.train.output_dir / "export"
    if not (export / "diffusers" / "sfumato_pipeline.py").exists() or not (export / "onnx").exists():
        run_export(run_cfg.train.output_dir)
    return export

"""Shared fixtures: one local Ray per test session, real data from ../shared/datasets."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (stages reuse it instead of starting their own)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _extract(archive: Path, dest: Path, limit_per_class: int) -> Path:
    """Extract up to `limit_per_class` files of every class folder of a tar(.gz)."""
    if not archive.exists():
        pytest.skip(f"{archive} is not there (../shared/datasets)")
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            cls = str(Path(member.name).parent)
            if taken.get(cls, 0) >= limit_per_class:
                continue
            taken[cls] = taken.get(cls, 0) + 1
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="session")
def flowers_dir(tmp_path_factory) -> Path:
    """12 real flower photos of each of the 5 classes: val/<class>/*.jpg."""
    return _extract(DATASETS / "flowers-val.tar", tmp_path_factory.mktemp("flowers"), 12) / "val"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """8 real CIFAR-10 JPEGs (32x32) of each of the 10 classes: train/<class>/*.jpg."""
    return _extract(DATASETS / "cifar10-train.tar.gz", tmp_path_factory.mktemp("cifar"), 8) / "train"


def debug_config(tmp_path: Path, sources: list[dict], *overrides: str):
    """configs/debug.yaml with the test's sources and output folder."""
    from sfumato.config import load_config

    return load_config(
        REPO / "configs" / "debug.yaml",
        [f"data.output_dir={tmp_path / 'data'}", f"data.sources={yaml.safe_dump(sources, default_flow_style=True).strip()}", *overrides],
    )


def save_tiny_vae(folder: Path):
    """A tiny random AutoencoderKL of the real class, saved as a pretrained one (folder/vae, safetensors)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.5)
    vae.save_pretrained(folder / "vae")
    return vae


def plain_state(model, lr: float = 2e-3, condition_dropout: float = 0.1, **state_fields):
    """A TrainState around `model` without Ray or DeepSpeed (PlainEngine: AdamW, clipping at 1),
    seeded, on the CPU: what the unit tests call `train_step` with."""
    import torch

    from sfumato.config import DiffusionConfig, OptimizerConfig
    from sfumato.diffusion.schedule import NoiseSchedule
    from sfumato.train.step import GradientWatch, PlainEngine, TrainState

    cfg = DiffusionConfig(condition_dropout=condition_dropout)
    return TrainState(engine=PlainEngine(model, OptimizerConfig(lr=lr), grad_clip_norm=1.0),
                      schedule=NoiseSchedule.from_config(cfg), diffusion_cfg=cfg,
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                      watch=GradientWatch(model), **state_fields)


# ------------------------------------------------------------------ trained runs (session-wide)
# Training tests and the evaluation/export tests share these: each debug run costs about a
# minute on two cores.
def run_config(tmp: Path, run: str, *overrides: str):
    """configs/debug.yaml on the CIFAR shards in `tmp`, with its run folder at tmp/run."""
    sources = [{"kind": "folder", "name": "cifar", "path": "/", "license": "research-only"}]
    return debug_config(tmp, sources, f"train.output_dir={tmp / run}", *overrides)


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory, cifar_dir, ray_local) -> Path:
    """A data folder: 80 real CIFAR-10 images ingested and sharded at 16 and 32 px."""
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards

    tmp = tmp_path_factory.mktemp("train")
    sources = [{"kind": "folder", "name": "cifar", "path": str(cifar_dir), "license": "research-only"}]
    cfg = debug_config(tmp, sources)
    run_ingest(cfg)
    run_shards(cfg)
    return tmp


@pytest.fixture(scope="session")
def straight(cifar_shards):
    """An uninterrupted class-conditional ZeRO-2 run of configs/debug.yaml."""
    from sfumato.train.loop import run_training

    cfg = run_config(cifar_shards, "straight")
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def text_run(cifar_shards):
    """A text-conditional run with its own BPE tokenizer and CLIP text encoder (wandb offline)."""
    from sfumato.train.loop import run_training

    cfg = run_config(cifar_shards, "text", "train.model=unet-text-tiny", "train.conditioning=text",
                     "train.text.vocab_size=400", "train.text.hidden_size=32", "train.text.num_heads=2",
                     "train.text.num_layers=1", "train.text.max_length=12", "train.class_balanced=true",
                     "train.wandb=true")
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def latent_run(cifar_shards):
    """A latent-diffusion run through a tiny random AutoencoderKL saved as a local 'pretrained' VAE."""
    from sfumato.train.loop import run_training

    save_tiny_vae(cifar_shards / "pretrained")
    cfg = run_config(cifar_shards, "latent", f"train.vae.pretrained={cifar_shards / 'pretrained'}",
                     "train.vae.subfolder=vae")
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def flow_run(cifar_shards):
    """A rectified-flow run (logit-normal times) with a resolution-dependent shift: 1.5 per 16 px,
    so 3.0 at the last stage's 32 px, the shift its export samples with."""
    from sfumato.train.loop import run_training

    cfg = run_config(cifar_shards, "flow", "diffusion.objective=flow", "diffusion.flow.shift=1.5",
                     "diffusion.flow.shift_base_px=16")
    run_training(cfg)
    return cfg

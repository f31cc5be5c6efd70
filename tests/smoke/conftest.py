"""Fixtures of the smoke tier: one local Ray per session, and the trained debug runs the
training, evaluation, export and serving tests share (each costs about a minute on two cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import debug_config, run_config, save_tiny_dinov2, save_tiny_vae


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (stages reuse it instead of starting their own)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory, cifar_dir, ray_local) -> Path:
    """A data folder: the 80 real CIFAR-10 images of tests/fixtures/cifar10 ingested and sharded
    at 16 and 32 px."""
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

    cfg = run_config(cifar_shards, "text", "train.model=unet-text-tiny", *TINY_TEXT, "train.wandb=true")
    run_training(cfg)
    return cfg


# A text run's own tokenizer and CLIP text encoder, tiny: 12 tokens of width 32.
TINY_TEXT = (
    "train.conditioning=text",
    "train.text.vocab_size=400",
    "train.text.hidden_size=32",
    "train.text.num_heads=2",
    "train.text.num_layers=1",
    "train.text.max_length=12",
    "train.class_balanced=true",
)


@pytest.fixture(scope="session")
def dit_run(cifar_shards):
    """`straight` with sfumato's DiT (dit-tiny) in place of the UNet: a class-conditional DiT run,
    trained with REPA to a tiny random DINOv2 (the projector trains and checkpoints with the run;
    evaluation and export must do without it)."""
    from sfumato.train.loop import run_training

    encoder = save_tiny_dinov2(cifar_shards / "dinov2")
    cfg = run_config(
        cifar_shards, "dit", "train.model=dit-tiny", f"train.repa={{encoder: {encoder}, depth: 1, projector_dim: 16}}"
    )
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def dit_text_run(cifar_shards):
    """`text_run` with sfumato's DiT reading the caption by cross-attention (dit-text-tiny)."""
    from sfumato.train.loop import run_training

    cfg = run_config(cifar_shards, "dit-text", "train.model=dit-text-tiny", *TINY_TEXT)
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def mmdit_run(cifar_shards):
    """`text_run` with sfumato's DiT reading the caption by joint attention (mmdit-tiny, SD3's MMDiT)."""
    from sfumato.train.loop import run_training

    cfg = run_config(cifar_shards, "mmdit", "train.model=mmdit-tiny", *TINY_TEXT)
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def latent_run(cifar_shards):
    """A latent-diffusion run through a tiny random AutoencoderKL saved as a local 'pretrained' VAE,
    trained from the latent cache (`sfumato cache`, built first)."""
    from sfumato.models.cache import run_cache
    from sfumato.train.loop import run_training

    save_tiny_vae(cifar_shards / "pretrained")
    cfg = run_config(
        cifar_shards, "latent", f"train.vae.pretrained={cifar_shards / 'pretrained'}", "train.vae.subfolder=vae"
    )
    run_cache(cfg)
    run_training(cfg)
    return cfg


@pytest.fixture(scope="session")
def flow_run(cifar_shards):
    """A rectified-flow run (logit-normal times) with a resolution-dependent shift: 1.5 per 16 px,
    so 3.0 at the last stage's 32 px, the shift its export samples with."""
    from sfumato.train.loop import run_training

    cfg = run_config(
        cifar_shards, "flow", "diffusion.objective=flow", "diffusion.flow.shift=1.5", "diffusion.flow.shift_base_px=16"
    )
    run_training(cfg)
    return cfg

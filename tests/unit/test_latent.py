"""Latent mode without Ray: a pretrained AutoencoderKL loaded from a local folder (a tiny random
one of the real class, saved as safetensors) encodes real images to latents the denoiser learns
on, stays frozen, and decodes samples back to pixels."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import helpers  # noqa: E402
from helpers import plain_state, save_tiny_vae  # noqa: E402
from sfumato.config import VAEConfig  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402
from sfumato.models.vae import LatentCodec  # noqa: E402
from sfumato.train.step import train_step  # noqa: E402


@pytest.fixture(scope="module")
def cifar_batch(cifar_dir):
    return helpers.cifar_batch(cifar_dir, 0, 16)


def test_latent_training_step_learns_and_leaves_the_vae_alone(tmp_path, cifar_batch):
    original = save_tiny_vae(tmp_path)
    codec = LatentCodec.load(VAEConfig(pretrained=str(tmp_path), subfolder="vae"))
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), codec.vae.state_dict().values()))
    assert (codec.downsample, codec.channels, codec.scale, codec.shift) == (2, 4, 0.5, 0.0)
    assert codec.latent_size(16) == 8
    with pytest.raises(
        ValueError, match="train.stages.1.resolution_px=15 is not a multiple of the VAE's downsampling factor 2"
    ):
        codec.latent_size(15, "train.stages.1.resolution_px")

    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 8, codec.channels)
    state = plain_state(model, codec=codec)
    losses = [train_step(state, cifar_batch)["loss"] for _ in range(40)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), (losses[:8], losses[-8:])
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), codec.vae.state_dict().values())), (
        "the VAE is frozen"
    )

    x = torch.from_numpy(cifar_batch["image"][:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = codec.encode(x, torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 8, 8)
    posterior = codec.vae.encode(x).latent_dist
    assert torch.allclose(codec.encode(x, torch.Generator().manual_seed(1)), z), "seeded: the same latents"
    assert torch.allclose(z, posterior.sample(torch.Generator().manual_seed(1)) * 0.5), "z = posterior sample x scale"
    pixels = codec.decode(z)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("float16", 2e-4)])
def test_cached_posterior_trains_like_the_vae_on_the_fly(tmp_path, cifar_batch, dtype, tolerance):
    """The latent cache stores each image's posterior mean and std; a step that draws z from them
    with the run's generator has the loss of a step that runs the VAE on the images with the same
    generator (same draw, same order), and never loads the VAE's weights."""
    from sfumato.models.cache import LATENT_MEAN, LATENT_STD

    save_tiny_vae(tmp_path)
    vae_cfg = VAEConfig(pretrained=str(tmp_path), subfolder="vae")
    on_the_fly, cached = LatentCodec.load(vae_cfg), LatentCodec.load(vae_cfg, lazy=True)
    x = torch.from_numpy(cifar_batch["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, std = on_the_fly.posterior(x)
    store = getattr(torch, dtype)
    batch = {**cifar_batch, LATENT_MEAN: mean.to(store).numpy(), LATENT_STD: std.to(store).numpy()}
    del batch["image"]  # the cache replaces the pixels

    losses = []
    for codec, data in ((on_the_fly, cifar_batch), (cached, batch)):
        torch.manual_seed(0)
        state = plain_state(build_denoiser("unet-tiny", 8, 4), codec=codec)
        losses.append([float(train_step(state, data)["loss"]) for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=tolerance)
    assert not cached.weights_loaded, "training from the cache never loads the VAE"
    assert cached.vae is not None and cached.weights_loaded, "decoding loads it on demand"


def test_cache_files_train_a_frozen_text_latent_model_like_its_encoders(tmp_path, cifar_dir):
    """The cache stage's callable (CacheEncoder, here without Ray) on a real shard, for a latent
    text model whose pretrained CLIP text encoder is frozen: read back by sample id (LatentCache),
    the posterior and the captions' encoder states train with the losses of running the VAE and
    the encoder every step, caption dropout substituting the cached empty caption's states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers import cache_row, caption_shard
    from sfumato.config import TextConfig
    from sfumato.data.loader import iter_batches
    from sfumato.layout import CacheFolder, read_json
    from sfumato.models.cache import TEXT_STATES, CacheEncoder, LatentCache, ShardEntry
    from sfumato.models.text import build_text_encoder, load_pretrained_tokenizer, train_tokenizer

    shard = tmp_path / "shard-000000.tar"
    captions = caption_shard(shard, cifar_dir)
    save_tiny_vae(tmp_path / "sd")
    tokenizer = train_tokenizer(captions * 3, 300, 12)
    torch.manual_seed(1)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(tmp_path / "sd" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "sd" / "tokenizer")
    vae_cfg = VAEConfig(pretrained=str(tmp_path / "sd"), subfolder="vae")
    text_cfg = TextConfig(
        pretrained=str(tmp_path / "sd"),
        encoder_subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
        train_encoder=False,
        max_length=12,
    )

    folder = CacheFolder(tmp_path / "cache")
    CacheEncoder(vae_cfg, text_cfg, "float32", 5, str(folder.root))(cache_row(shard))
    sidecar = read_json(CacheFolder.sidecar(folder.shard(16, 0)))
    assert sidecar["samples"] == 12 and sidecar["shapes"] == {
        "mean": [4, 8, 8],
        "std": [4, 8, 8],
        "text_states": [12, 32],
    }
    cache = LatentCache(folder, [ShardEntry(shard, 16, 0, "abc")], [sidecar])
    batch = next(iter_batches([shard], 12, 16))
    cached = {k: v for k, v in cache.attach(batch).items() if k not in ("image", "caption")}
    assert cached[TEXT_STATES].shape == (12, 12, 32)

    losses = []
    for data, codec in ((batch, LatentCodec.load(vae_cfg)), (cached, LatentCodec.load(vae_cfg, lazy=True))):
        tok = load_pretrained_tokenizer(text_cfg.pretrained, text_cfg.tokenizer_subfolder)
        torch.manual_seed(0)
        model = build_denoiser("unet-text-tiny", 8, 4, text_encoder=build_text_encoder(text_cfg, tok))
        state = plain_state(model, condition_dropout=0.5, codec=codec, tokenizer=tok, max_length=12)
        losses.append([float(train_step(state, data)["loss"]) for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_cache_key_follows_the_vae_weights_and_revision_not_its_scaling(tmp_path, monkeypatch):
    """The cache folder's key: new weights under the same local path, another hub snapshot, or
    another stored dtype give a new cache; the scaling factor (applied at the draw) does not."""
    import huggingface_hub
    from diffusers import AutoencoderKL

    from helpers import debug_config
    from sfumato.models.cache import cache_folder

    save_tiny_vae(tmp_path / "sd")
    demo = [{"kind": "demo", "name": "demo", "num_images": 8}]

    def key(pretrained, *overrides):
        cfg = debug_config(
            tmp_path,
            demo,
            f"train.output_dir={tmp_path / 'run'}",
            f"train.vae.pretrained={pretrained}",
            "train.vae.subfolder=vae",
            *overrides,
        )
        return cache_folder(cfg).root.name

    local = key(tmp_path / "sd")
    assert key(tmp_path / "sd", "train.vae.scaling_factor=0.3") == local
    assert key(tmp_path / "sd", "data.cache.dtype=float32") != local
    vae = AutoencoderKL.from_pretrained(tmp_path / "sd", subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "sd" / "vae")
    assert key(tmp_path / "sd") != local, "retrained weights under the same folder"

    hub = tmp_path / "hub" / "models--org--vae"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    keys = []
    for commit in ("abc123", "def456"):
        (hub / "snapshots" / commit / "vae").mkdir(parents=True)
        (hub / "snapshots" / commit / "vae" / "config.json").write_text("{}")
        (hub / "refs").mkdir(exist_ok=True)
        (hub / "refs" / "main").write_text(commit)
        keys.append(key("org/vae"))
    assert keys[0] != keys[1], "a hub id is keyed by the snapshot from_pretrained loads"

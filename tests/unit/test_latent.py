"""Latent mode without Ray: a pretrained AutoencoderKL loaded from a local folder (a tiny random
one of the real class, saved as safetensors) encodes real images to latents the denoiser learns
on, stays frozen, and decodes samples back to pixels."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.config import VAEConfig  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402
from sfumato.models.vae import LatentCodec  # noqa: E402
from sfumato.train.step import train_step  # noqa: E402

import helpers  # noqa: E402
from helpers import plain_state, save_tiny_vae  # noqa: E402


@pytest.fixture(scope="module")
def cifar_batch(cifar_dir):
    return helpers.cifar_batch(cifar_dir, 0, 16)


def test_latent_training_step_learns_and_leaves_the_vae_alone(tmp_path, cifar_batch):
    original = save_tiny_vae(tmp_path)
    codec = LatentCodec.load(VAEConfig(pretrained=str(tmp_path), subfolder="vae"))
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), codec.vae.state_dict().values()))
    assert (codec.downsample, codec.channels, codec.scale, codec.shift) == (2, 4, 0.5, 0.0)
    assert codec.latent_size(16) == 8
    with pytest.raises(ValueError, match="train.stages.1.resolution_px=15 is not a multiple of the VAE's downsampling factor 2"):
        codec.latent_size(15, "train.stages.1.resolution_px")

    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 8, codec.channels)
    state = plain_state(model, codec=codec)
    losses = [train_step(state, cifar_batch)["loss"] for _ in range(40)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), (losses[:8], losses[-8:])
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), codec.vae.state_dict().values())), \
        "the VAE is frozen"

    x = torch.from_numpy(cifar_batch["image"][:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = codec.encode(x, torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 8, 8)
    posterior = codec.vae.encode(x).latent_dist
    assert torch.allclose(codec.encode(x, torch.Generator().manual_seed(1)), z), "seeded: the same latents"
    assert torch.allclose(z, posterior.sample(torch.Generator().manual_seed(1)) * 0.5), "z = posterior sample x scale"
    pixels = codec.decode(z)
    assert pixels.shape == (2, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1

"""Latent mode: a pretrained, frozen `AutoencoderKL` between pixels and the denoiser.

The denoiser trains on `(z - shift) * scale`, z drawn from the encoder's posterior with the
run's generator (so resume stays exact); sample grids decode back to pixels. The VAE is loaded
from a hub id or a local folder (safetensors only), stays in fp32 (the half-precision VAE
decoder is a known source of NaNs), and is never trained, averaged or checkpointed: the run's
config names it.

With the latent cache (sfumato.models.cache) training reads each image's posterior mean and std
from disk and makes the same draw (`draw_latents`) without the encoder; the codec then loads the
VAE's weights only when something decodes (`lazy=True`).
"""

from __future__ import annotations

import torch


def draw_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None, scale: float, shift: float
) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) drawn from `generator`, then shifted and scaled: the
    posterior sample of diffusers' DiagonalGaussianDistribution, the same call on the same
    generator, so cached and on-the-fly latents consume the same random numbers."""
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift) * scale


class LatentCodec:
    def __init__(
        self,
        vae: torch.nn.Module | None,
        scaling_factor: float,
        shift_factor: float,
        config: dict | None = None,
        load_vae=None,
    ):
        self._vae = vae
        self._load_vae = load_vae
        self.config = vae.config if vae is not None else config
        """The AutoencoderKL's config (block_out_channels, latent_channels, ...)."""
        self.scale = scaling_factor
        self.shift = shift_factor

    @classmethod
    def load(cls, vae_cfg, device: torch.device | str = "cpu", lazy: bool = False) -> LatentCodec:
        """The config's VAE; `lazy`: read its config now and its weights at the first use of `.vae`."""
        from diffusers import AutoencoderKL

        def load_vae() -> torch.nn.Module:
            vae = AutoencoderKL.from_pretrained(vae_cfg.pretrained, subfolder=vae_cfg.subfolder, use_safetensors=True)
            return vae.requires_grad_(False).eval().to(device=device, dtype=torch.float32)

        vae = None if lazy else load_vae()
        config = (
            vae.config
            if vae is not None
            else AutoencoderKL.load_config(vae_cfg.pretrained, subfolder=vae_cfg.subfolder)
        )
        scale = vae_cfg.scaling_factor if vae_cfg.scaling_factor is not None else config["scaling_factor"]
        shift = vae_cfg.shift_factor if vae_cfg.shift_factor is not None else (config.get("shift_factor") or 0.0)
        return cls(vae, float(scale), float(shift), dict(config), load_vae)

    @property
    def vae(self) -> torch.nn.Module:
        if self._vae is None:
            self._vae = self._load_vae()
        return self._vae

    @property
    def weights_loaded(self) -> bool:
        return self._vae is not None

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along a side."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def channels(self) -> int:
        return self.config["latent_channels"]

    def latent_size(self, resolution_px: int, where: str = "resolution_px") -> int:
        if resolution_px % self.downsample:
            raise ValueError(
                f"{where}={resolution_px} is not a multiple of the VAE's downsampling factor {self.downsample}"
            )
        return resolution_px // self.downsample

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], NCHW -> the posterior's (mean, std), float32, unscaled: what the
        latent cache stores."""
        posterior = self.vae.encode(images.float()).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW -> scaled latents, in the images' dtype."""
        mean, std = self.posterior(images)
        return draw_latents(mean, std, generator, self.scale, self.shift).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.float() / self.scale + self.shift).sample.clamp(-1, 1)

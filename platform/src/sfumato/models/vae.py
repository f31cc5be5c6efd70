"""Latent mode: a pretrained, frozen `AutoencoderKL` between pixels and the denoiser.

The denoiser trains on `(z - shift) * scale`, z drawn from the encoder's posterior with the
run's generator (so resume stays exact); sample grids decode back to pixels. The VAE is loaded
from a hub id or a local folder (safetensors only), stays in fp32 (the half-precision VAE
decoder is a known source of NaNs), and is never trained, averaged or checkpointed: the run's
config names it.
"""

from __future__ import annotations

import torch


class LatentCodec:
    def __init__(self, vae: torch.nn.Module, scaling_factor: float, shift_factor: float):
        self.vae = vae
        self.scale = scaling_factor
        self.shift = shift_factor

    @classmethod
    def load(cls, vae_cfg, device: torch.device | str = "cpu") -> "LatentCodec":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_cfg.pretrained, subfolder=vae_cfg.subfolder, use_safetensors=True)
        vae.requires_grad_(False).eval().to(device=device, dtype=torch.float32)
        scale = vae_cfg.scaling_factor if vae_cfg.scaling_factor is not None else vae.config.scaling_factor
        shift = vae_cfg.shift_factor if vae_cfg.shift_factor is not None else (vae.config.shift_factor or 0.0)
        return cls(vae, float(scale), float(shift))

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along a side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels

    def latent_size(self, resolution_px: int, where: str = "resolution_px") -> int:
        if resolution_px % self.downsample:
            raise ValueError(f"{where}={resolution_px} is not a multiple of the VAE's downsampling "
                             f"factor {self.downsample}")
        return resolution_px // self.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], NCHW -> scaled latents, in the images' dtype."""
        posterior = self.vae.encode(images.float()).latent_dist
        return ((posterior.sample(generator) - self.shift) * self.scale).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.float() / self.scale + self.shift).sample.clamp(-1, 1)

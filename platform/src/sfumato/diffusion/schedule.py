"""DDPM noise schedules: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

The betas come from diffusers' DDPMScheduler, so training, sampling and the exported diffusers
pipeline share one definition of abar_t (linear, scaled-linear, or cosine = "squaredcos_cap_v2",
Nichol & Dhariwal 2021), optionally rescaled to zero terminal SNR (Lin et al. 2023, "Common
Diffusion Noise Schedules and Sample Steps are Flawed").
"""

from __future__ import annotations

import torch

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def make_scheduler(cfg, resolution_px: int | None = None):
    """The diffusers scheduler for the config's `diffusion` section, the base every sampler is
    configured from: DDPM's noise schedule, or for flow runs FlowMatchEulerDiscreteScheduler with
    the run's time shift at `resolution_px` (None: the shift without its resolution scaling)."""
    if cfg.objective == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        shift = cfg.flow.shift if resolution_px is None else cfg.flow.shift_at(resolution_px)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=shift)
    return ddpm_scheduler(cfg)


def ddpm_scheduler(cfg):
    """diffusers' DDPMScheduler on the config's noise schedule (DDPM runs)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        clip_sample=False,
    )


class NoiseSchedule:
    """abar_t as a tensor, with the three quantities a loss needs."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)

    @classmethod
    def from_config(cls, cfg) -> NoiseSchedule:
        return cls(ddpm_scheduler(cfg).alphas_cumprod)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape).to(like.dtype), (1 - abar).sqrt().view(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """What the network predicts: the noise (epsilon), or v = sqrt(abar) eps - sqrt(1-abar) x0
        (Salimans & Ho 2022)."""
        if prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) per timestep (float64; inf-safe at t=0)."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

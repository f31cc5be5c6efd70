"""Rectified flow matching, in the papers' notation (Liu et al. 2022, "Flow Straight and Fast";
Lipman et al. 2022, "Flow Matching for Generative Modeling"; Esser et al. 2024, SD3):

    x_t = (1 - t) x_0 + t eps,       t in (0, 1),  eps ~ N(0, I)
    v   = dx_t / dt = eps - x_0      (the target: a straight path from data to noise)
    L   = E_t || f(x_t, t, c) - v ||^2

Training times are uniform or logit-normal (SD3's rf/lognorm), then shifted by
t' = s t / (1 + (s - 1) t) (SD3 sec. 5.3.2), the same shift the sampler uses. The network's time
input is t x num_train_timesteps, as diffusers' FlowMatchEulerDiscreteScheduler feeds it, so an
exported folder samples with that scheduler unchanged. Sampling integrates dx/dt = f from t = 1
(noise) to t = 0 (data) with Euler or Heun steps.
"""

from __future__ import annotations

import torch


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): s > 1 moves times towards noise, s = 1 leaves them."""
    return shift * t / (1 + (shift - 1) * t)


def sample_times(
    batch: int, flow_cfg, resolution_px: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Training times in (0, 1), drawn as `flow_cfg.timestep_sampling` says, shifted for the
    resolution (float32, on the generator's device, then moved)."""
    gen_device = generator.device if generator is not None else device
    if flow_cfg.timestep_sampling == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device)
    else:
        normal = torch.randn(batch, generator=generator, device=gen_device)
        t = torch.sigmoid(flow_cfg.logit_mean + flow_cfg.logit_std * normal)
    return shift_times(t, flow_cfg.shift_at(resolution_px)).to(device)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps, t per sample."""
    t = t.view((-1,) + (1,) * (x0.ndim - 1)).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target eps - x_0."""
    return noise - x0


def validation_times(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` times at the midpoints of equal bins of (0, 1): the whole path, evenly."""
    return (torch.arange(count, device=device, dtype=torch.float32) + 0.5) / count

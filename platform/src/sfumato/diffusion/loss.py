"""The diffusion training losses, in the papers' notation: DDPM here, rectified flow in
`flow_loss` (its notation in sfumato.diffusion.flow).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,     t ~ U{0..T-1},  eps ~ N(0, I) (+ offset)
    L   = E_t [ w(t) * || f(x_t, t, c) - target ||^2 ]

Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy") gives each timestep the weight min(SNR_t, gamma) on the x_0-space error. The network
predicts eps or v instead, whose errors relate to x_0's by
    ||eps - eps^||^2 = SNR ||x_0 - x_0^||^2,      ||v - v^||^2 = (SNR + 1) ||x_0 - x_0^||^2,
so the same weighting is min(SNR, gamma) / SNR for epsilon- and min(SNR, gamma) / (SNR + 1)
for v-prediction.
Noise offset (Guttenberg 2023) adds a per-channel constant to eps so the model learns to change
an image's mean brightness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sfumato.diffusion import flow
from sfumato.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def min_snr_weight(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight for the predicted quantity; all ones without gamma."""
    if gamma is None:
        return torch.ones_like(snr)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped / (snr + 1)


def sample_noise(x0: torch.Tensor, noise_offset: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise_offset > 0:
        offset = torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator, device=x0.device, dtype=x0.dtype)
        noise = noise + noise_offset * offset
    return noise


def drop_conditions(
    keep_shape: int, probability: float, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean mask of samples whose condition is dropped (classifier-free guidance training,
    Ho & Salimans 2022): the model learns the unconditional score from the same batches."""
    if probability <= 0:
        return torch.zeros(keep_shape, dtype=torch.bool, device=device)
    return torch.rand(keep_shape, generator=generator, device=device) < probability


def token_lever(denoise) -> torch.nn.Module | None:
    """The network of a denoiser (or of the engine around it) that draws random tokens in this
    forward (sfumato's DiT training with routing or masking), else None."""
    net = getattr(getattr(denoise, "module", denoise), "net", None)
    return net if getattr(net, "draws_tokens", False) else None


def predict_and_mask(denoise, x_t, t, cond, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, loss mask): a DiT with token levers draws its tokens from the training's
    generator (a resumed run draws the same) and, when it masks patches, says which pixels it
    predicted (1) and which it dropped (0); None: every pixel counts."""
    net = token_lever(denoise)
    if net is None:
        return denoise(x_t, t, cond), None
    net.token_generator = generator
    try:
        prediction = denoise(x_t, t, cond)
    finally:
        net.token_generator = None
    return prediction, net.loss_mask


def squared_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error, over the predicted pixels only when `mask` is given."""
    error = (prediction.float() - target.float()).pow(2)
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    mask = mask.float().expand_as(error)
    return (error * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1)


def diffusion_loss(
    denoise: Denoiser,
    x0: torch.Tensor,
    cond,
    schedule: NoiseSchedule,
    cfg,
    generator: torch.Generator | None = None,
    resolution_px: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Mean weighted MSE over a batch; `cfg` is the config's `diffusion` section, whose objective
    picks DDPM (below) or rectified flow (`flow_loss`). `resolution_px`: the images' size in
    pixels (flow's resolution-dependent shift; None: x0's width). Returns (loss, stats) with
    stats detached for logging."""
    if cfg.objective == "flow":
        return flow_loss(denoise, x0, cond, cfg, generator, resolution_px or x0.shape[-1])
    batch = x0.shape[0]
    t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=generator, device=x0.device)
    noise = sample_noise(x0, cfg.noise_offset, generator)
    x_t = schedule.add_noise(x0, noise, t)
    prediction, mask = predict_and_mask(denoise, x_t, t, cond, generator)
    per_sample = squared_error(prediction, schedule.target(x0, noise, t, cfg.prediction_type), mask)
    weight = min_snr_weight(schedule.snr(t), cfg.min_snr_gamma, cfg.prediction_type).to(per_sample)
    loss = (weight * per_sample).mean()
    return loss, {"loss_unweighted": per_sample.mean().detach(), "t_mean": t.float().mean()}


def flow_loss(
    denoise: Denoiser, x0: torch.Tensor, cond, cfg, generator: torch.Generator | None, resolution_px: int
) -> tuple[torch.Tensor, dict]:
    """L = E_t || f(x_t, t, c) - (eps - x_0) ||^2, x_t = (1 - t) x_0 + t eps (sfumato.diffusion.flow).
    Unweighted: the time distribution (logit-normal, shift) is the weighting (SD3 sec. 3.1)."""
    t = flow.sample_times(x0.shape[0], cfg.flow, resolution_px, generator, x0.device)
    noise = sample_noise(x0, cfg.noise_offset, generator)
    prediction, mask = predict_and_mask(
        denoise, flow.interpolate(x0, noise, t), t * cfg.num_train_timesteps, cond, generator
    )
    loss = squared_error(prediction, flow.velocity(x0, noise), mask).mean()
    return loss, {"loss_unweighted": loss.detach(), "t_mean": t.mean()}


def validation_timesteps(num_train_timesteps: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` timesteps at the midpoints of equal bins of [0, T): the whole noise range, evenly."""
    return ((torch.arange(count, device=device) + 0.5) * num_train_timesteps / count).long()


@torch.no_grad()
def validation_loss(
    denoise: Denoiser, x0: torch.Tensor, cond, schedule: NoiseSchedule, cfg, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-image plain MSE of the prediction target, averaged over `count` evenly spaced times
    of the whole noise range, with noise from `generator` (seeded the same at every evaluation).
    Unweighted, without noise offset, condition dropout or time shift: it stays one yardstick
    while Min-SNR-gamma, the offset, the dropout or the time distribution are what a sweep
    varies. `cfg`: the `diffusion` section (DDPM and flow losses are not comparable)."""
    total = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.float32)
    if cfg.objective == "flow":
        for t_value in flow.validation_times(count).tolist():
            t = torch.full((x0.shape[0],), t_value, device=x0.device, dtype=torch.float32)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            prediction = denoise(flow.interpolate(x0, noise, t), t * cfg.num_train_timesteps, cond)
            total += (prediction.float() - flow.velocity(x0, noise).float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        return total / count
    prediction_type, timesteps = cfg.prediction_type, validation_timesteps(cfg.num_train_timesteps, count, x0.device)
    for t_value in timesteps.tolist():
        t = torch.full((x0.shape[0],), t_value, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        prediction = denoise(schedule.add_noise(x0, noise, t), t, cond)
        target = schedule.target(x0, noise, t, prediction_type)
        total += (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    return total / len(timesteps)

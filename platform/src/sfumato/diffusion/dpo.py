"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization"), for every objective sfumato trains.

A pair is two images of one condition c, x_w preferred over x_l. Both are noised with the same
timestep t and the same noise eps; the per-sample denoising error of a network f is

    e(f, x) = mean over pixels || f(x_t, t, c) - target(x, eps, t) ||^2

with the objective's own target: eps (epsilon), v (v-prediction) or the velocity eps - x_0
(rectified flow, x_t = (1 - t) x_0 + t eps). With the trained policy f_theta and a frozen
reference copy f_ref:

    inside = -beta / 2 * [ (e(theta, x_w) - e(ref, x_w)) - (e(theta, x_l) - e(ref, x_l)) ]
    L      = -log sigmoid(inside)

i.e. the policy is rewarded for denoising the preferred image better than the reference does,
relative to the rejected one. At theta = ref, inside = 0 and L = log 2 for every pair. This is
diffusers' research example's form (errors as per-pixel means, so beta is of the order of
thousands: the paper's beta T w(t) with the weighting folded in); `inside > 0` is the implicit
reward accuracy, and `inside` itself the reward margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sfumato.diffusion import flow
from sfumato.diffusion.loss import Denoiser, sample_noise
from sfumato.diffusion.schedule import NoiseSchedule


def draw_times_and_noise(
    x0: torch.Tensor, cfg, generator: torch.Generator | None, resolution_px: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One timestep per pair and one noise per pair (`x0`: the preferred images, B x C x H x W),
    drawn as the pre-training loss draws them (flow: the configured time distribution and shift;
    DDPM: uniform discrete steps, plus the noise offset)."""
    if cfg.objective == "flow":
        t = flow.sample_times(x0.shape[0], cfg.flow, resolution_px or x0.shape[-1], generator, x0.device)
    else:
        t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    return t, sample_noise(x0, cfg.noise_offset, generator)


def denoising_errors(
    denoise: Denoiser, x0: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, cfg
) -> torch.Tensor:
    """Per-sample mean squared error of `denoise`'s prediction against the objective's target."""
    if cfg.objective == "flow":
        prediction = denoise(flow.interpolate(x0, noise, t), t * cfg.num_train_timesteps, cond)
        target = flow.velocity(x0, noise)
    else:
        prediction = denoise(schedule.add_noise(x0, noise, t), t, cond)
        target = schedule.target(x0, noise, t, cfg.prediction_type)
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))


def dpo_loss(
    policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict]:
    """Per-pair losses (not reduced) and detached statistics from the four per-sample errors."""
    inside = -0.5 * beta * ((policy_w - ref_w) - (policy_l - ref_l))
    losses = -F.logsigmoid(inside)
    stats = {
        "reward_accuracy": (inside > 0).float().mean().detach(),
        "reward_margin": inside.mean().detach(),
        "policy_error_chosen": policy_w.mean().detach(),
        "policy_error_rejected": policy_l.mean().detach(),
    }
    return losses, stats


def pair_loss(
    policy: Denoiser,
    reference: Denoiser,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    cond,
    schedule: NoiseSchedule,
    cfg,
    beta: float,
    generator: torch.Generator | None = None,
    resolution_px: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """The batch's mean DPO loss: chosen and rejected go through each network in one forward pass,
    with the same t and noise; the reference runs without gradients. `cond`: the pairs'
    conditions (a tensor of B rows, or None)."""
    batch = chosen.shape[0]
    t, noise = draw_times_and_noise(chosen, cfg, generator, resolution_px)
    both, t2, noise2 = torch.cat([chosen, rejected]), torch.cat([t, t]), torch.cat([noise, noise])
    cond2 = None if cond is None else torch.cat([cond, cond])
    policy_errors = denoising_errors(policy, both, cond2, t2, noise2, schedule, cfg)
    with torch.no_grad():
        ref_errors = denoising_errors(reference, both, cond2, t2, noise2, schedule, cfg)
    losses, stats = dpo_loss(policy_errors[:batch], policy_errors[batch:], ref_errors[:batch], ref_errors[batch:], beta)
    return losses.mean(), stats

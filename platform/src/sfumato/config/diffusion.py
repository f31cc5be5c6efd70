"""The `diffusion` section: the objective (DDPM or rectified flow) and its noise schedule, and the
samplers every stage that draws images chooses from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StrictFloat, model_validator

from sfumato.config.base import Frozen


class FlowConfig(Frozen):
    """Rectified flow (diffusion.objective: flow): x_t = (1 - t) x_0 + t eps, the network predicts
    the velocity eps - x_0 (Liu et al. 2022; Lipman et al. 2022), as SD3 and Flux train."""

    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    """How training draws t in (0, 1): uniform, or logit-normal (t = sigmoid(n), n ~ N(mean, std)),
    which puts more of the training on the middle of the path (Esser et al. 2024, SD3, sec. 3.1:
    rf/lognorm(0.00, 1.00) ranked best)."""
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0)
    """Time shift t' = s t / (1 + (s - 1) t) applied to training times and sampling steps alike:
    s > 1 spends more of both at high noise (SD3 uses 3.0 at 1024 px)."""
    shift_base_px: int | None = Field(None, ge=8)
    """Set: the shift is resolution-dependent, shift x resolution_px / shift_base_px (SD3,
    sec. 5.3.2: sqrt(m / n) for m and n pixels), so a curriculum's larger stages see more noise.
    None: `shift` at every resolution."""

    def shift_at(self, resolution_px: int) -> float:
        """The time shift at an image resolution (pixels, also for latent runs)."""
        return self.shift if self.shift_base_px is None else self.shift * resolution_px / self.shift_base_px


class DiffusionConfig(Frozen):
    objective: Literal["ddpm", "flow"] = "ddpm"
    """ddpm: discrete-time diffusion with the noise schedule and prediction type below (Min-SNR);
    flow: rectified flow matching (`flow`), sampled with flow-euler or flow-heun."""
    flow: FlowConfig = FlowConfig()
    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    """DDPM: discrete timesteps; flow: the scale of the network's time input (t x this, as
    diffusers' FlowMatchEulerDiscreteScheduler feeds it)."""
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "cosine"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float | None = Field(5.0, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE."""
    noise_offset: float = Field(0.0, ge=0, le=1)
    zero_terminal_snr: bool = False
    """Rescale the schedule so the last step is pure noise (Lin et al. 2023); needs v-prediction."""
    condition_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of dropping a sample's caption/class, for classifier-free guidance."""

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionConfig:
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type: v_prediction (epsilon is undefined at SNR 0)")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start={self.beta_start} must be below beta_end={self.beta_end}")
        return self


Sampler = Literal["ddpm", "ddim", "dpm-solver++", "flow-euler", "flow-heun"]
"""DDPM runs: diffusers' DDPMScheduler, DDIMScheduler (eta 0) and DPMSolverMultistepScheduler
(DPM-Solver++, Lu et al. 2022, order 2) on the run's noise schedule. Flow runs: Euler or Heun
(2nd order) along the learnt velocity, diffusers' FlowMatchEuler/HeunDiscreteScheduler.
sfumato.diffusion.sample.SAMPLERS; a run's sampler must fit its objective."""


def _two_items(value):
    """A list or tuple of another length is refused in words (pydantic would say "Field required"
    of item 1); anything else goes on to the tuple's own checks."""
    if isinstance(value, (list, tuple)) and len(value) != 2:
        raise ValueError(f"must be [lo, hi]: 2 numbers, not {len(value)}")
    return value


def check_guidance_interval(interval: tuple[float, float]) -> tuple[float, float]:
    """`interval` unchanged if it is [lo, hi] with 0 <= lo <= hi <= 1; else a ValueError."""
    lo, hi = interval
    if not 0 <= lo <= hi <= 1:  # NaN fails every comparison
        raise ValueError(f"must be [lo, hi] with 0 <= lo <= hi <= 1, got [{lo}, {hi}]")
    return interval


GuidanceInterval = Annotated[
    tuple[StrictFloat, StrictFloat], BeforeValidator(_two_items), AfterValidator(check_guidance_interval)
]
"""Classifier-free guidance only at the steps whose noise level t / num_train_timesteps (1: pure
noise) lies in [lo, hi]; the other steps make one conditional model call (Kynkäänniemi et al.
2024: guidance at high noise costs diversity and buys little, at low noise it does nothing; EDM2
on ImageNet-512 went from FID 1.81 to 1.40). Numbers only: true or "0.5" is refused, not read as one."""

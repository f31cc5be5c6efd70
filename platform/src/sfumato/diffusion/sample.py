"""Fixed-seed sampling: image i always starts from the noise of seed + i, so two checkpoints (or a
run and its export) are compared on identical noise, whatever the batch size.

Samplers are diffusers' schedulers configured from the same `diffusion` section the model was
trained with, so sampling and training share one definition of the noise schedule. Timesteps
are spaced "trailing" (Lin et al. 2023, table 2): the first step starts at the last trained
timestep, which matters for few-step sampling.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sfumato.diffusion.schedule import make_scheduler

DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
FLOW_SAMPLERS = ("flow-euler", "flow-heun")
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS


def make_sampler(diffusion_cfg, name: str, resolution_px: int | None = None):
    """A diffusers scheduler on the run's noise schedule. DDPM runs: ddpm (ancestral, Ho et al.
    2020), ddim (deterministic, eta 0; Song et al. 2021) or dpm-solver++ (2nd order multistep;
    Lu et al. 2022), the last two good at 20-50 steps. Flow runs: flow-euler or flow-heun (2nd
    order, two network calls a step but the last), with the run's time shift at `resolution_px`."""
    return sampler_from(make_scheduler(diffusion_cfg, resolution_px).config, name)


def is_flow(scheduler_config) -> bool:
    """Whether a scheduler config is a flow-matching one (it has a time shift, no betas)."""
    return "shift" in scheduler_config and "beta_schedule" not in scheduler_config


def sampler_from(scheduler_config, name: str):
    """The named sampler on the noise schedule of any of these schedulers' configs (an exported
    pipeline's, for one); a flow model takes flow samplers only, a DDPM model the others."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
    )

    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    flow = is_flow(scheduler_config)
    if flow != (name in FLOW_SAMPLERS):
        raise ValueError(
            f"sampler {name!r} does not fit a {'flow-matching' if flow else 'DDPM'} model; "
            f"choose one of {FLOW_SAMPLERS if flow else DDPM_SAMPLERS}"
        )
    keys = ("num_train_timesteps", "shift")
    if name == "flow-euler":
        return FlowMatchEulerDiscreteScheduler(**{k: scheduler_config[k] for k in keys})
    if name == "flow-heun":
        return FlowMatchHeunDiscreteScheduler(**{k: scheduler_config[k] for k in keys})
    if name == "ddpm":
        return DDPMScheduler.from_config(scheduler_config, timestep_spacing="leading")  # diffusers' DDPM default
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    if name == "dpm-solver++":
        # final_sigmas_type "zero" is what a zero-terminal-SNR schedule needs; harmless otherwise.
        return DPMSolverMultistepScheduler.from_config(
            scheduler_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            final_sigmas_type="zero",
        )
    raise AssertionError(f"sampler {name!r} is listed but not built")


def generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image (CPU so the noise is the same on every device)."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(first_index, first_index + count)]


def sample(
    pipe,
    num_images: int,
    seed: int,
    steps: int,
    guidance_scale: float = 1.0,
    conditions=None,
    first_index: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Images in [0, 1], NCHW, from a SfumatoPipeline: images first_index .. first_index+num_images
    of the seed's sequence. `conditions` (one per image): prompts or token ids for a text model,
    class indices or names for a class model, None for an unconditional one (or "no condition").
    height, width: pixels (None: the model's training size). guidance_interval: guide only at
    noise levels in [lo, hi] (SfumatoPipeline.__call__; None: at every step)."""
    kwargs = {}
    if conditions is not None and pipe.text_encoder is not None:
        kwargs = {"prompt_ids": conditions} if torch.is_tensor(conditions) else {"prompt": list(conditions)}
    elif conditions is not None:
        kwargs = {"class_labels": [c if isinstance(c, str) else int(c) for c in conditions]}
    elif pipe.text_encoder is not None:
        kwargs = {"prompt": [""] * num_images}
    guidance = guidance_scale if pipe.is_conditional else 1.0
    return pipe(
        **kwargs,
        batch_size=num_images,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_interval=guidance_interval,
        generator=generators(seed, first_index, num_images),
        output_type="pt",
    ).images


def to_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """NCHW in [0, 1] -> one PNG-ready RGB grid."""
    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    pixels = (images.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img[..., :3]
    return Image.fromarray(grid)

"""Fixed-seed sampling for training-time grids: the same noise for every checkpoint, so two
grids differ only by the weights. DDPM or DDIM steps from diffusers' schedulers, configured from
the same `diffusion` section the model was trained with."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sfumato.diffusion.schedule import make_scheduler


@torch.no_grad()
def sample(model, diffusion_cfg, sample_cfg, resolution_px: int, in_channels: int = 3,
           cond: torch.Tensor | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images in [-1, 1], NCHW, from `sample_cfg.num_images` seeded noise tensors."""
    from diffusers import DDIMScheduler

    scheduler = make_scheduler(diffusion_cfg)
    if sample_cfg.sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(sample_cfg.steps)
    generator = torch.Generator("cpu").manual_seed(sample_cfg.seed)
    shape = (sample_cfg.num_images, in_channels, resolution_px, resolution_px)
    x = torch.randn(shape, generator=generator).to(device)
    for t in scheduler.timesteps:
        t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        prediction = model(x, t_batch, cond)
        x = scheduler.step(prediction, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


def to_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """NCHW in [-1, 1] -> one PNG-ready RGB grid."""
    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    pixels = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img[..., :3]
    return Image.fromarray(grid)

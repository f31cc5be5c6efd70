"""The compositional yardstick's segmenter (sfumato.evaluate.compositional): its network, the
rendered scenes it learns from, the augmentation that makes it read generated images, and its
training loop.

Per pixel it predicts a shape (background + 4) and a colour (background + 6). The targets are
exact: the scenes are drawn here (sfumato.data.scenes.label_maps). Every combination is drawn,
held-out ones too: the segmenter is the judge, not the model under test.

Why these settings (BENCHMARKS.md, "Compositional yardstick"): shapes are learnt late, after a
plateau whose end comes with optimizer steps more than with images seen, so the batch is small
(16) and object pixels weigh 3 to 1 in the loss; at 32 px 470 steps take about 20 s on two cores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfumato.config import SegmenterConfig
from sfumato.data import scenes
from sfumato.data.scenes import COLOURS, SHAPES, Prompt, Thing

log = logging.getLogger(__name__)

VERSION = 1  # of the network, its training data and augmentation: part of the fingerprint
SHAPE_CLASSES = ("background", *SHAPES)
COLOUR_CLASSES = ("background", *COLOURS)


# ------------------------------------------------------------------------------------ network
def _block(channels_in: int, channels_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.SiLU(),
    )


class SegmenterNet(nn.Module):
    """A small U-Net: a 3x3 block at full resolution (`width` channels), two at 1/2 (2 x width),
    four at 1/4 (4 x width; dilations 1, 1, 2, 4 give a receptive field of about 70 px, the whole
    image at 32-48 px, which a shape's class needs), decoded back by a 3x3 block at each
    resolution over the upsampled features and the skip, then per-pixel shape and colour logits."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.at_full = _block(3, w)
        self.at_half = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.at_quarter = nn.Sequential(
            _block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w), _block(4 * w, 4 * w, dilation=2)
        )
        self.context = _block(4 * w, 4 * w, dilation=4)
        self.up_half = _block(6 * w, 2 * w)
        self.up_full = _block(3 * w, w)
        self.shape_head = nn.Conv2d(w, len(SHAPE_CLASSES), 1)
        self.colour_head = nn.Conv2d(w, len(COLOUR_CLASSES), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.at_full(x)
        half = self.at_half(full)
        quarter = self.context(self.at_quarter(half))
        half = self.up_half(torch.cat([F.interpolate(quarter, size=half.shape[-2:], mode="bilinear"), half], 1))
        full = self.up_full(torch.cat([F.interpolate(half, size=full.shape[-2:], mode="bilinear"), full], 1))
        return self.shape_head(full), self.colour_head(full)


# ------------------------------------------------------------------------------ training data
def random_objects(rng: np.random.Generator) -> tuple[scenes.SceneObject, ...]:
    """1-4 objects of any shape and colour, laid out as the demo lays out a scene (one: in the
    middle, larger; more: in the 2 x 2 grid), each 15 % smaller or larger at most."""
    names = list(COLOURS)
    count = int(rng.integers(1, 5))
    things = tuple(
        Thing(SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.integers(len(names)))]) for _ in range(count)
    )
    objects = scenes.layout(Prompt("scene", "", things), rng)
    return tuple(dataclasses.replace(o, r=o.r * float(rng.uniform(0.85, 1.15))) for o in objects)


def training_scenes(count: int, resolution_px: int, noise_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(images uint8 [N, H, W, 3], shape targets int64 [N, H, W], colour targets [N, H, W]): random
    scenes drawn with 1, 2 or 4 x supersampling on a ground within 30 levels of the demo's grey,
    and `noise_fraction` of noise images whose targets are all background."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, resolution_px, resolution_px, 3), np.uint8)
    shape_maps = np.zeros((count, resolution_px, resolution_px), np.int64)
    colour_maps = np.zeros_like(shape_maps)
    for i in range(count):
        if rng.random() < noise_fraction:
            mean, spread = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5)
            noise = mean + spread * rng.standard_normal((resolution_px, resolution_px, 3))
            images[i] = np.round(np.clip(noise, 0, 1) * 255).astype(np.uint8)
            continue
        objects = random_objects(rng)
        ground = np.clip(np.array(scenes.BACKGROUND) + rng.integers(-30, 31, 3), 0, 255)
        supersample = int(rng.choice([1, 2, 4], p=[0.2, 0.3, 0.5]))
        images[i] = np.asarray(scenes.render(objects, resolution_px, supersample, tuple(int(v) for v in ground)))
        shape_maps[i], colour_maps[i] = scenes.label_maps(objects, resolution_px)
    return images, shape_maps, colour_maps


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred by its own sigma (pixels; 0: unchanged), a separable 5-tap kernel."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [n, 5]; sigma ~0: a delta
    weight = kernel.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.conv2d(
        F.pad(x.reshape(1, n * c, h, w), (2, 2, 0, 0), mode="replicate"), weight[:, None, None, :], groups=n * c
    )
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), weight[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """images float [N, 3, H, W] in [0, 1], targets int64 [N, 2, H, W] (shape, colour) -> the
    network's input in [-1, 1] and the targets shifted alike. A generated image is never a clean
    render: its edges are soft or ragged, its colours off, its flat areas mottled."""
    n, _, height, width = images.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    pad = max(1, height // 16)  # a shift of up to 2 px at 32 px
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    padded_targets = F.pad(targets.float(), (pad,) * 4, mode="replicate").long()
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])
    y = torch.stack([padded_targets[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])
    blurred = torch.rand(n, generator=generator) < 0.5
    x = gaussian_blur(x, torch.where(blurred, uniform(0.3, 1.0), torch.zeros(n)))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean + uniform(-0.08, 0.08, 1, 1, 1)
    x = x * uniform(0.9, 1.1, 3, 1, 1) + uniform(-0.04, 0.04, 3, 1, 1)
    mottle = torch.randn(n, 3, max(1, height // 4), max(1, width // 4), generator=generator)
    x = x + uniform(0.0, 0.05, 1, 1, 1) * F.interpolate(mottle, size=(height, width), mode="bilinear")
    x = x + uniform(0.0, 0.08, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1) * 2 - 1, y


def train_net(resolution_px: int, settings: SegmenterConfig, device: str = "cpu") -> tuple[SegmenterNet, dict]:
    """A segmenter trained from nothing on `settings.scenes` rendered scenes, and what to record
    of its training. Deterministic for the same settings (initialisation, scenes, batch order
    and augmentation are seeded; the caller's torch RNG is left as it was)."""
    s = settings
    started = time.perf_counter()
    images, shape_maps, colour_maps = training_scenes(s.scenes, resolution_px, s.noise_fraction, s.seed)
    rendered_s = time.perf_counter() - started
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8: a quarter of float's memory
    targets = torch.from_numpy(np.stack([shape_maps, colour_maps], 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = SegmenterNet(s.width).to(device, memory_format=torch.channels_last)  # a third faster on CPU
    generator = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = math.ceil(len(x) / s.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch)
    net.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), s.batch_size):
            batch = order[start : start + s.batch_size]
            inputs, wanted = augment(x[batch].float() / 255, targets[batch], generator)
            shape_logits, colour_logits = net(inputs.to(device, memory_format=torch.channels_last))
            wanted = wanted.to(device)
            weight = 1 + (s.foreground_weight - 1) * (wanted[:, 0] > 0).float()
            loss = (F.cross_entropy(shape_logits, wanted[:, 0], reduction="none") * weight).mean() + (
                F.cross_entropy(colour_logits, wanted[:, 1], reduction="none") * weight
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    meta = {
        "version": VERSION,
        "scene_design": scenes.DESIGN,
        "settings": s.model_dump(mode="json"),
        "resolution_px": resolution_px,
        "render_seconds": round(rendered_s, 2),
        "train_seconds": round(time.perf_counter() - started, 2),
        "final_loss": round(loss.item(), 4),
    }
    log.info(
        "compositional segmenter: %d scenes at %d px, %d epochs in %.1f s",
        s.scenes,
        resolution_px,
        s.epochs,
        meta["train_seconds"],
    )
    return net, meta

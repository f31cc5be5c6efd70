"""Named denoiser sizes, each a one-line constructor (as DiT's `DiT_models` dict does).

Every model is wrapped in `Denoiser`, whose forward is `(x_t, t, class_labels) -> prediction`
whatever the family, so the loss, the EMA, DeepSpeed and the samplers never branch on it.
Class-conditional models reserve the last class index as the "no class" label that
classifier-free guidance trains with and samples against.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel


def _unet(channels: tuple[int, ...], layers: int, attention: tuple[bool, ...], heads_dim: int = 32) -> Callable:
    def build(resolution_px: int, in_channels: int, num_classes: int | None) -> torch.nn.Module:
        return UNet2DModel(
            sample_size=resolution_px,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=channels,
            layers_per_block=layers,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            attention_head_dim=heads_dim,
            norm_num_groups=min(32, channels[0]),
            num_class_embeds=None if num_classes is None else num_classes + 1,
        )
    return build


def _dit(depth: int, hidden: int, heads: int, patch: int) -> Callable:
    def build(resolution_px: int, in_channels: int, num_classes: int | None) -> torch.nn.Module:
        return DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=in_channels,
            out_channels=in_channels,
            num_layers=depth,
            sample_size=resolution_px,
            patch_size=patch,
            # adaLN-Zero needs a label: unconditional runs use the single "no class" label.
            num_embeds_ada_norm=(num_classes or 0) + 1,
        )
    return build


# name -> constructor; parameters at 64 px, 3 channels, 10 classes (measured), in the comments.
MODELS: dict[str, Callable] = {
    "unet-tiny": _unet((32, 64), 1, (False, True), heads_dim=16),  # 0.7 M: tests, debug
    "unet-s": _unet((64, 128, 256), 2, (False, True, True)),  # 16 M: pilot, 32-64 px
    "unet-b": _unet((128, 256, 256, 512), 2, (False, True, True, True)),  # 75 M
    "unet-l": _unet((224, 448, 672, 896), 2, (False, True, True, True)),  # 274 M
    "dit-tiny": _dit(depth=2, hidden=64, heads=2, patch=4),  # 0.2 M: tests
    "dit-s": _dit(depth=12, hidden=384, heads=6, patch=2),  # DiT-S/2, 35 M
    "dit-b": _dit(depth=12, hidden=768, heads=12, patch=2),  # DiT-B/2, 138 M
    "dit-l": _dit(depth=24, hidden=1024, heads=16, patch=2),  # DiT-L/2, 487 M
}


class Denoiser(torch.nn.Module):
    """(x_t, t, class_labels) -> the network's prediction, for any registered family."""

    def __init__(self, net: torch.nn.Module, num_classes: int | None):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.is_dit = isinstance(net, DiTTransformer2DModel)

    @property
    def null_class(self) -> int:
        return self.num_classes or 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_dit:
            if class_labels is None:
                class_labels = torch.full((x_t.shape[0],), self.null_class, device=x_t.device, dtype=torch.long)
            return self.net(x_t, timestep=t, class_labels=class_labels).sample
        if self.num_classes is None:
            return self.net(x_t, t).sample
        if class_labels is None:
            class_labels = torch.full((x_t.shape[0],), self.null_class, device=x_t.device, dtype=torch.long)
        return self.net(x_t, t, class_labels=class_labels).sample


def build_denoiser(name: str, resolution_px: int, in_channels: int = 3, num_classes: int | None = None) -> Denoiser:
    if name not in MODELS:
        raise KeyError(f"model {name!r} is not registered; choose one of {sorted(MODELS)}")
    return Denoiser(MODELS[name](resolution_px, in_channels, num_classes), num_classes)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

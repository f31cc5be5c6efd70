"""Named denoiser sizes, each a one-line constructor (as DiT's `DiT_models` dict does).

Every model is wrapped in `Denoiser`, whose forward is `(x_t, t, cond) -> prediction`
whatever the family, so the loss, the EMA, DeepSpeed and the samplers never branch on it.
`cond` is class indices for class-conditional models, which reserve the last index as the
"no class" label that classifier-free guidance trains with and samples against; for
text-conditional models (`unet-text-*`, diffusers `UNet2DConditionModel`; `dit-text-*` and
`mmdit-*`, sfumato's DiT) it is token ids (or a frozen encoder's cached states of them), and the
text encoder (CLIP or T5, sfumato.models.text) is a submodule of the Denoiser, so it trains,
averages and checkpoints with it; a frozen one is only checkpointed (no gradients, optimizer
state or EMA copy) and stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from sfumato.diffusion.pipeline import predict
from sfumato.models.dit import SfumatoDiT
from sfumato.models.names import MODEL_FAMILIES, TEXT_MODELS


def _unet(
    channels: tuple[int, ...], layers: int, attention: tuple[bool, ...], heads_dim: int = 32, text: bool = False
) -> Callable:
    """A pixel-space UNet; `text=True` gives Stable Diffusion's layout, cross-attending to the
    caption's token states (`cond` is then the text encoder's width, else the class count)."""
    down = ("CrossAttnDownBlock2D" if text else "AttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D" if text else "AttnUpBlock2D", "UpBlock2D")

    def build(resolution_px: int, in_channels: int, cond: int | None) -> torch.nn.Module:
        common = dict(
            sample_size=resolution_px,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=channels,
            layers_per_block=layers,
            down_block_types=tuple(down[0] if a else down[1] for a in attention),
            up_block_types=tuple(up[0] if a else up[1] for a in reversed(attention)),
            attention_head_dim=heads_dim,
            norm_num_groups=min(32, channels[0]),
        )
        if text:
            return UNet2DConditionModel(**common, mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cond)
        return UNet2DModel(**common, num_class_embeds=None if cond is None else cond + 1)

    return build


def _dit(depth: int, hidden: int, heads: int, text: str | None = None) -> Callable:
    """sfumato's DiT (sfumato.models.dit) with 2 px patches. `text`: how the image reads the
    caption ("cross" attention or "joint" MMDiT), and `cond` is then the caption states' width;
    None: a class (or unconditional) model, `cond` the class count."""

    def build(resolution_px: int, in_channels: int, cond: int | None) -> torch.nn.Module:
        common = dict(
            in_channels=in_channels,
            sample_size=resolution_px,
            patch_size=2,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
        )
        if text is not None:
            return SfumatoDiT(**common, cross_attention_dim=cond, text_attention=text)
        return SfumatoDiT(**common, num_class_embeds=None if cond is None else cond + 1)

    return build


# DiT sizes: (depth, hidden, heads), DiT's S/B/L/XL (Peebles & Xie 2023) and two small ones.
DIT_SIZES = {
    "tiny": (2, 64, 2),  # tests
    "xs": (6, 192, 3),  # the pilots on 2 CPU cores
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}

# name -> constructor; parameters at 64 px, 3 channels, 10 classes (measured), in the comments.
MODELS: dict[str, Callable] = {
    "unet-tiny": _unet((32, 64), 1, (False, True), heads_dim=16),  # 0.7 M: tests, debug
    # Three levels, attention only at the lowest (8x8 at 32 px): a receptive field that spans the
    # image for 1.1-1.2x unet-tiny's step time (`sfumato bench train`, BENCHMARKS.md).
    "unet-xs": _unet((32, 64, 128), 1, (False, False, True)),  # 2.7 M: the pilot (2 CPU cores)
    "unet-s": _unet((64, 128, 256), 2, (False, True, True)),  # 16 M: 32-64 px
    "unet-b": _unet((128, 256, 256, 512), 2, (False, True, True, True)),  # 75 M
    "unet-l": _unet((224, 448, 672, 896), 2, (False, True, True, True)),  # 274 M
    "unet-text-tiny": _unet((32, 64), 1, (False, True), heads_dim=16, text=True),  # 1.0 M + text encoder: tests
    # unet-xs with cross-attention where it has attention (8 px at 32 px, and the middle block):
    # a word reaches each cell of the compositional world at unet-xs's step time (the text pilot).
    "unet-text-xs": _unet((32, 64, 128), 1, (False, False, True), text=True),  # 3.9 M + text encoder
    "unet-text-s": _unet((64, 128, 256), 2, (False, True, True), text=True),  # 24 M + text encoder
    # dit-<size>: class / unconditional; dit-text-<size>: text by cross-attention (PixArt);
    # mmdit-<size>: text by joint attention (SD3). Parameters and FLOPs: BENCHMARKS.md.
    **{f"dit-{size}": _dit(*shape) for size, shape in DIT_SIZES.items()},
    **{f"dit-text-{size}": _dit(*shape, text="cross") for size, shape in DIT_SIZES.items()},
    **{f"mmdit-{size}": _dit(*shape, text="joint") for size, shape in DIT_SIZES.items()},
}


if set(MODELS) != set(MODEL_FAMILIES):  # names.py is what the config validates against, without torch
    raise ImportError(f"sfumato.models.names lists {sorted(MODEL_FAMILIES)}, the registry builds {sorted(MODELS)}")


class Denoiser(torch.nn.Module):
    """(x_t, t, cond) -> the network's prediction, for any registered family."""

    def __init__(self, net: torch.nn.Module, num_classes: int | None, text_encoder: torch.nn.Module | None = None):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.text_encoder = text_encoder

    @property
    def null_class(self) -> int:
        return self.num_classes or 0

    def train(self, mode: bool = True) -> Denoiser:
        """A frozen text encoder is a fixed function of the caption: it stays in eval mode (no
        dropout; T5's dropout_rate is 0.1), so the states it gives equal the cache's."""
        from sfumato.models.text import is_frozen

        super().train(mode)
        if self.text_encoder is not None and is_frozen(self.text_encoder):
            self.text_encoder.eval()
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return predict(self.net, x_t, t, cond, self.text_encoder)


def build_denoiser(
    name: str,
    resolution_px: int,
    in_channels: int = 3,
    num_classes: int | None = None,
    text_encoder: torch.nn.Module | None = None,
) -> Denoiser:
    if name not in MODELS:
        raise KeyError(f"model {name!r} is not registered; choose one of {sorted(MODELS)}")
    if (name in TEXT_MODELS) != (text_encoder is not None):
        raise ValueError(
            f"model {name!r} {'needs' if name in TEXT_MODELS else 'takes no'} text encoder: "
            f"text-conditional models are {sorted(TEXT_MODELS)}"
        )
    if text_encoder is not None:
        from sfumato.models.text import states_width

        net = MODELS[name](resolution_px, in_channels, states_width(text_encoder))
        return Denoiser(net, None, text_encoder)
    return Denoiser(MODELS[name](resolution_px, in_channels, num_classes), num_classes)


def empty_like(denoiser: Denoiser) -> Denoiser:
    """The same architecture with fresh, unpartitioned weights: what EMA weights are copied into
    for sampling, whatever ZeRO stage holds the trained model."""
    net = type(denoiser.net).from_config(denoiser.net.config)
    text = None if denoiser.text_encoder is None else type(denoiser.text_encoder)(denoiser.text_encoder.config)
    out = Denoiser(net, denoiser.num_classes, text)
    if getattr(denoiser, "repa", None) is not None:  # REPA's projector: the same names as the EMA's
        import copy

        out.repa = copy.deepcopy(denoiser.repa)
    return out


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

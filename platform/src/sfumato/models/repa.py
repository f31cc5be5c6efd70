"""Representation alignment (REPA, Yu et al. 2025, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think"), for sfumato's DiTs.

A frozen, pretrained image encoder (DINOv2 in the paper; any transformers vision transformer
whose output ends with one token per patch: Dinov2Model, Dinov2WithRegistersModel, ViTModel)
reads the clean image; a small MLP (the projector) maps the DiT's tokens after its first `depth`
blocks, which see only the noisy image, to the encoder's width; the loss adds `weight` times the
negative cosine similarity between each token's projection and the encoder's feature at the same
place. The clean image is resized to (rows x patch, columns x patch) pixels, so the encoder's
patch grid is the DiT's token grid, as REPA resizes 256 px to DINOv2's 224 (16 x 16 either way).

Training only: the projector rides on the denoiser (`Denoiser.repa`, so it is optimised,
averaged and checkpointed with the model and a resumed run goes on with it), the encoder on the
training state. Sampling, evaluation and export never run either; `without_projector` strips
the projector's weights where a run's weights are read for anything else.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "repa."
"""The projector's parameter names in a denoiser's (and its checkpoints') state."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def projector(hidden_size: int, width: int, features: int) -> nn.Sequential:
    """REPA's: three linear layers with SiLU between them."""
    return nn.Sequential(
        nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, features)
    )


def without_projector(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's weights without REPA's projector: what the DiT (and its text encoder) are."""
    return {name: value for name, value in weights.items() if not name.startswith(PREFIX)}


class RepaTarget:
    """The frozen encoder: clean images in, one feature per DiT token out."""

    def __init__(self, cfg, device: torch.device | str = "cpu"):
        from transformers import AutoModel

        where = "train.repa.encoder"
        try:
            self.encoder = AutoModel.from_pretrained(cfg.encoder).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}={cfg.encoder!r}: no transformers image encoder there: {err}") from None
        config = self.encoder.config
        self.patch = getattr(config, "patch_size", None)
        if not isinstance(self.patch, int) or not hasattr(config, "hidden_size"):
            raise ValueError(
                f"{where}={cfg.encoder!r} is a {type(self.encoder).__name__}: REPA needs a vision transformer "
                "with one output token per patch (Dinov2Model, Dinov2WithRegistersModel, ViTModel)"
            )
        self.dim = config.hidden_size
        self.weight = cfg.weight
        mean, std = _normalisation(cfg.encoder)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.options = (
            {"interpolate_pos_encoding": True}
            if "interpolate_pos_encoding" in inspect.signature(self.encoder.forward).parameters
            else {}
        )
        self.source = cfg.encoder

    @torch.no_grad()
    def features(self, images: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """(batch, rows * columns, dim) for float NCHW images in [0, 1], in the DiT's token order
        (row by row)."""
        x = F.interpolate(
            images.float(), size=(rows * self.patch, columns * self.patch), mode="bicubic", antialias=True
        )
        x = (x.clamp(0, 1) - self.mean) / self.std
        out = self.encoder(pixel_values=x, **self.options).last_hidden_state
        if out.shape[1] < rows * columns:
            raise ValueError(
                f"train.repa.encoder={self.source!r} gave {out.shape[1]} tokens for a {rows} x {columns} grid of "
                f"{self.patch} px patches: not one token per patch"
            )
        return out[:, -rows * columns :]  # after the class (and register) tokens


def _normalisation(source: str) -> tuple[tuple, tuple]:
    """The encoder's image mean and std from its image processor, ImageNet's without one."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(processor.image_mean), tuple(processor.image_std)


def attach(denoiser: nn.Module, cfg, device: torch.device | str = "cpu") -> RepaTarget:
    """Load train.repa's encoder and give the denoiser its projector (fresh weights, seeded by
    the caller's RNG; once: a denoiser that has one keeps it)."""
    target = RepaTarget(cfg, device)
    if getattr(denoiser, "repa", None) is None:
        denoiser.repa = projector(denoiser.net.config.hidden_size, cfg.projector_dim, target.dim).to(device)
    return target


def alignment_loss(model, images: torch.Tensor, target: RepaTarget) -> torch.Tensor:
    """1 - the mean cosine similarity between the projected tokens the DiT kept in its last
    training forward and the encoder's features of the clean `images` (NCHW in [-1, 1], pixels)
    at the same grid positions."""
    denoiser = getattr(model, "module", model)  # the DeepSpeed engine's or the plain model
    kept = denoiser.net.repa_tokens
    if kept is None:
        raise RuntimeError("REPA: the DiT kept no tokens (set_repa and a training-mode forward come first)")
    tokens, positions, rows, columns = kept
    denoiser.net.repa_tokens = None
    features = target.features((images + 1) / 2, rows, columns)
    features = type(denoiser.net)._take(features, positions)  # the DiT's own token gather
    projected = denoiser.repa(tokens)
    return 1 - F.cosine_similarity(projected.float(), features.float(), dim=-1).mean()

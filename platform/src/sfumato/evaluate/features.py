"""Feature extractors for Fréchet distances: the FID Inception, or CLIP's image tower.

A Fréchet distance is only as meaningful as the network whose features it compares. FID
(Heusel et al. 2017) uses the TF Inception of 2015; Kynkäänniemi et al. 2023 show it can be
moved by ImageNet-class cues alone, and Stein et al. 2023 find distances in other feature
spaces (CLIP, DINOv2) track human judgement better. Inception needs a weight file that sfumato
cannot download (see inception.py), CLIP is already configured for curation, so both are here
behind one interface: `name` says which network (numbers with different names are not
comparable), `metric` what to call the number ("FID" or "FD-CLIP").

Every extractor takes float NCHW RGB in [-1, 1] of any size (the diffusion sampler's range)
and preprocesses in torch, so generated images never round-trip through PIL or uint8.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sfumato.evaluate.inception import FIDInceptionV3, load_fid_inception, weights_path

log = logging.getLogger(__name__)


class FeatureExtractor(Protocol):
    name: str
    metric: str
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """float NCHW RGB in [-1, 1] -> float64 [N, dim]."""


def _batched(fn, images: torch.Tensor, batch_size: int, device: str, dim: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(device=device, dtype=torch.float32).contiguous()
            out.append(fn(chunk).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, dim))


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception: what published FID numbers use."""

    metric = "FID"
    dim = 2048

    def __init__(self, source, device: str = "cpu", batch_size: int = 64):
        """`source`: weights for `load_fid_inception` (file, folder or hub id), or an
        `FIDInceptionV3` instance (tests: a random one, named as such)."""
        if isinstance(source, FIDInceptionV3):
            self.model, self.name = source, "inception-v3 (in-memory weights)"
        else:
            path = weights_path(source)  # once: a hub id is resolved (and downloaded) here
            self.model, self.name = load_fid_inception(path), f"inception-v3 ({path.stem})"
        self.model = self.model.eval().to(device)
        self.device, self.batch_size = device, batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return _batched(self.model, images, self.batch_size, self.device, self.dim)


class Clip:
    """One loaded transformers CLIPModel (hub id or local folder, safetensors) with its
    tokenizer and preprocessing done in torch: what FD-CLIP and CLIPScore share."""

    def __init__(self, source: str, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.source, self.device = source, device
        self.model = CLIPModel.from_pretrained(source, use_safetensors=True).eval().to(device)
        processor = CLIPImageProcessor.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.image_px = self.model.config.vision_config.image_size
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] NCHW -> CLIP's input: the processor's steps (shortest side to the model's
        size, bicubic with antialiasing as PIL does, centre crop, mean/std) on the tensor."""
        x = (images.to(self.device, torch.float32) + 1) / 2
        height, width = x.shape[-2:]
        short = min(height, width)  # the long side floored, as transformers' shortest_edge resize does
        size = (self.image_px * height // short, self.image_px * width // short)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_px) // 2, (size[1] - self.image_px) // 2
        x = x[..., top : top + self.image_px, left : left + self.image_px].clamp(0, 1)  # bicubic overshoots
        return (x - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings, not normalised, float32 [N, projection_dim]."""
        return _tensor(self.model.get_image_features(pixel_values=self.pixel_values(images)))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings, not normalised; captions truncated to the model's positions."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        return _tensor(self.model.get_text_features(**tokens))


def _tensor(features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):  # transformers 5 returns an output object
        features = features.pooler_output
    return features.float()


class ClipFeatures:
    """CLIP image embeddings for FD-CLIP. Unnormalised, as FD-DINOv2 / FD-CLIP are computed
    (Stein et al. 2023; Kynkäänniemi et al. 2023): the Fréchet distance compares the feature
    distribution as the network produces it, norms included."""

    metric = "FD-CLIP"

    def __init__(self, source: str | Clip, device: str = "cpu", batch_size: int = 64):
        self.clip = source if isinstance(source, Clip) else Clip(source, device)
        self.name = f"clip:{self.clip.source}"
        self.dim = self.clip.model.config.projection_dim
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return _batched(self.clip.image_features, images, self.batch_size, self.clip.device, self.dim)


def load_extractor(
    inception: str | None, clip: str | None, device: str = "cpu", batch_size: int = 64
) -> FeatureExtractor:
    """Inception when its weights are configured (a load failure is an error: a CLIP number in
    place of the FID that was asked for would be silently incomparable), else CLIP."""
    if inception is not None:
        return InceptionFeatures(inception, device, batch_size)
    if clip is not None:
        log.info("no evaluate.inception_weights: Fréchet distance in CLIP features (FD-CLIP, %s), not FID", clip)
        return ClipFeatures(clip, device, batch_size)
    raise ValueError(
        "no feature network for the Fréchet distance: set evaluate.inception_weights (pytorch-fid's "
        "Inception as safetensors, see sfumato/evaluate/inception.py) or evaluate.clip_model "
        "(defaults to data.curate.clip.model)"
    )

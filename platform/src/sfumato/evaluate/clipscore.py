"""CLIPScore (Hessel et al. 2021): how well each generated image matches its prompt.

    CLIPScore(image, caption) = w * max(cos(E_image, E_text), 0)

Hessel et al. use w = 2.5 to stretch the range of their CLIP ViT-B/32; text-to-image papers and
torchmetrics report w = 100, which is what this returns, so a score reads as a percentage of
perfect alignment in [0, 100]. It is reference-free: no human caption or real image is needed,
only the prompt the image was generated from. The absolute value depends on the CLIP model, so
a score is only comparable with scores from the same `source`.

Images go through the same torch preprocessing as FD-CLIP (`features.Clip`); captions are
tokenised by the model's tokenizer and truncated to its positions (77 for OpenAI CLIP).
"""

from __future__ import annotations

import numpy as np
import torch

from sfumato.evaluate.features import Clip

CLIPSCORE_WEIGHT = 100.0


def clip_scores(
    images: torch.Tensor, captions: list[str], source: str | Clip, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Per-pair CLIPScores, float64 [N]: image i (float NCHW RGB in [-1, 1]) with caption i.
    `source`: a CLIP hub id or local folder (loaded onto `device`), or an already loaded
    `Clip` (shared with FD-CLIP, on its own device)."""
    if len(images) != len(captions):
        raise ValueError(f"CLIPScore pairs images with captions: {len(images)} images, {len(captions)} captions")
    clip = source if isinstance(source, Clip) else Clip(source, device)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            image = clip.image_features(images[start : start + batch_size])
            text = clip.text_features(captions[start : start + batch_size])
            cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1, eps=1e-12)
            scores.append((CLIPSCORE_WEIGHT * cosine.clamp_min(0)).double().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def clip_score(
    images: torch.Tensor, captions: list[str], source: str | Clip, device: str = "cpu", batch_size: int = 64
) -> float:
    """Mean CLIPScore over the (image, caption) pairs, in [0, 100]."""
    if len(images) == 0:
        raise ValueError("CLIPScore of no images is undefined")
    return float(clip_scores(images, captions, source, device, batch_size).mean())

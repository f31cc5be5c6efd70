"""A scripted judge standing in for people on the A/B page (sfumato.abtest): its taste is clear
and checkable, so an alignment run trained on its votes can be scored against it."""

from __future__ import annotations

import numpy as np

JUDGE = "scripted judge: prefers the brighter background (mean luminance of the outer 3-px frame)"
TIE_LEVELS = 2.0


def background_luminance(image: np.ndarray, frame: int = 3) -> float:
    """Mean luminance (0-255) of the outer `frame` pixels of an HWC uint8 image."""
    rgb = image.astype(np.float64)
    lum = 0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]
    mask = np.ones(lum.shape, bool)
    mask[frame:-frame, frame:-frame] = False
    return float(lum[mask].mean())


def judge(left: np.ndarray, right: np.ndarray) -> str:
    """'left', 'right' or 'tie' (backgrounds within TIE_LEVELS of 255 of each other)."""
    a, b = background_luminance(left), background_luminance(right)
    if abs(a - b) < TIE_LEVELS:
        return "tie"
    return "left" if a > b else "right"

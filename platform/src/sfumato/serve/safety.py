"""The output safety filter: every generated image is scored before it leaves the model replica.

The scorer is the curation stage's (sfumato.data.safety.NsfwScorer): a CLIP model (hub id or
local folder, transformers format) compares the image with the unsafe and safe prompt sets; a
score at or above the threshold flags it. A flagged image is withheld (the response names it and
its score, and carries no pixels of it) or, by config, sent blurred beyond recognition. With no
model configured the filter is off, and says so (startup log, /v1/model, every response).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PASSED, WITHHELD, BLURRED, UNCHECKED = "passed", "withheld", "blurred", "unchecked"


@dataclass(frozen=True)
class Verdict:
    action: str
    """passed | withheld | blurred | unchecked (filter off)"""
    score: float | None = None


def blur(image: np.ndarray) -> np.ndarray:
    """A Gaussian blur whose radius is an eighth of the image's longer side: shapes and colours
    survive, no detail does."""
    from PIL import Image, ImageFilter

    radius = max(image.shape[:2]) / 8
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


class OutputFilter:
    def __init__(
        self, model: str, threshold: float, action: str, unsafe: list[str], safe: list[str], device: str = "cpu"
    ):
        from sfumato.data.embed import ClipEmbedder
        from sfumato.data.safety import NsfwScorer

        if action not in ("withhold", "blur"):
            raise ValueError(f"safety_action {action!r} is not one of withhold, blur")
        self.threshold, self.action = threshold, action
        self.scorer = NsfwScorer(ClipEmbedder(model, device=device), unsafe, safe)

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray | None, Verdict]]:
        """Each image with its verdict: the image itself (passed), None (withheld) or its blur."""
        out = []
        for image, score in zip(images, self.scorer.images(images)):
            score = float(score)
            if score < self.threshold:
                out.append((image, Verdict(PASSED, score)))
            elif self.action == "blur":
                out.append((blur(image), Verdict(BLURRED, score)))
            else:
                out.append((None, Verdict(WITHHELD, score)))
        return out

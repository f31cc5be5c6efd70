"""Does a model draw its data or copy it, and does it draw all of it? Nearest neighbours in the
domain yardstick's features (sfumato.evaluate.domain), against what real images give.

Three figures, each set beside the value a real sample of the same size gets, so that a number
can be placed without a pretrained network:

- **The FD-domain floor**: the Fréchet distance from `n` real training images (n = the sample's
  count) to the held-out reference. Real images are disjoint from the reference, so this is the
  best a model can score at that count (FD is biased upwards at small counts; the floor carries
  the same bias). The ceiling is Gaussian noise's figure (Yardstick.noise_fd_domain).
- **Coverage** (a recall figure): the share of real held-out images whose nearest generated image
  is closer than their nearest image of a real training subset of the same size. A model drawing
  new images from the data distribution scores about 0.5 (the real subsets' own figure,
  `coverage_real`, says how close to 0.5 at this count); one drawing a single perfect image per
  class, or noise, scores near 0. (In the spirit of Kynkäänniemi et al. 2019's recall, counted
  per held-out image against a same-size real set rather than a k-NN radius.)
- **Memorisation**: each sample's nearest training image in features, then the closest in
  pixels among its `candidates` nearest (RMSE in [0, 1]). A sample is *closer than real* when its
  feature distance is below the `quantile` of the held-out images' own nearest-training
  distances (a model that draws new images gets about `quantile`), and a *copy* when its pixel
  distance is also below the held-out images' `quantile` in pixels. The closest pairs are kept
  for the report, side by side.

Features are float64 [N, D]; images uint8 NHWC at one resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from PIL import Image

CHUNK = 1024  # query rows per distance matrix


def nearest(query: np.ndarray, bank: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances [N, k] (ascending) and indices [N, k] of each query row's k nearest
    rows of `bank`."""
    k = min(k, len(bank))
    if len(query) == 0:
        return np.zeros((0, k)), np.zeros((0, k), np.int64)
    bank_t = torch.from_numpy(np.ascontiguousarray(bank, np.float64))
    distances, indices = [], []
    for start in range(0, len(query), CHUNK):
        q = torch.from_numpy(np.ascontiguousarray(query[start : start + CHUNK], np.float64))
        d, i = torch.cdist(q, bank_t).topk(k, dim=1, largest=False)
        distances.append(d.numpy())
        indices.append(i.numpy())
    return np.concatenate(distances), np.concatenate(indices)


def pixel_rmse(images: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] against uint8 [N, K, H, W, 3] -> RMSE [N, K] in [0, 1] units."""
    a = images.astype(np.float32)[:, None] / 255
    b = candidates.astype(np.float32) / 255
    return np.sqrt(((a - b) ** 2).mean(axis=(2, 3, 4)))


def to_uint8(images) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = torch.as_tensor(images).detach().float().cpu()
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class Closest:
    """Each query's nearest training image: in features first, then in pixels among those."""

    feature_distance: np.ndarray  # [N] to the nearest training image in features
    pixel_rmse: np.ndarray  # [N] to the closest in pixels among the `candidates` nearest in features
    train_index: np.ndarray  # [N] that image's index


@dataclass(eq=False)
class RealSets:
    """The yardstick's real images and their features: the training images (what a model may
    copy) and the held-out ones (FD-domain's reference). `seed` orders the real subsets that stand
    in for a sample of a given size."""

    train: np.ndarray  # uint8 NHWC
    train_features: np.ndarray  # float64 [N_train, D]
    heldout: np.ndarray
    heldout_features: np.ndarray
    seed: int = 0
    quantile: float = 0.05
    candidates: int = 8

    def __post_init__(self):
        if len(self.train) < 2 or len(self.heldout) < 1:
            raise ValueError(f"{len(self.train)} training and {len(self.heldout)} held-out images: need 2 and 1")
        if self.train.shape[1:] != self.heldout.shape[1:]:
            raise ValueError(f"training images {self.train.shape[1:]} and held-out {self.heldout.shape[1:]} differ")

    def closest(self, images: np.ndarray, features: np.ndarray) -> Closest:
        distance, index = nearest(features, self.train_features, self.candidates)
        rmse = np.concatenate(  # 256 queries at a time: the candidates' pixels are copied
            [pixel_rmse(images[i : i + 256], self.train[index[i : i + 256]]) for i in range(0, len(images), 256)]
            or [np.zeros((0, index.shape[1]))]
        )
        best = rmse.argmin(axis=1)
        rows = np.arange(len(images))
        return Closest(distance[:, 0], rmse[rows, best], index[rows, best])

    @cached_property
    def thresholds(self) -> tuple[float, float]:
        """(feature, pixel) distance below which only `quantile` of held-out images lie."""
        heldout = self.closest(self.heldout, self.heldout_features)
        return (
            float(np.quantile(heldout.feature_distance, self.quantile)),
            float(np.quantile(heldout.pixel_rmse, self.quantile)),
        )

    @cached_property
    def heldout_median_distance(self) -> float:
        return float(np.median(nearest(self.heldout_features, self.train_features)[0][:, 0]))

    def subsets(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two disjoint seeded subsets of training indices, each min(n, N_train // 2) long: the
        real sample a model's is set against (A) and one standing in for a perfect model (B)."""
        m = min(n, len(self.train) // 2)
        order = np.random.default_rng(self.seed).permutation(len(self.train))
        return order[:m], order[m : 2 * m]


def coverage(heldout_features: np.ndarray, generated: np.ndarray, real: np.ndarray) -> float:
    """Share of held-out images whose nearest `generated` row is closer than their nearest `real`
    row (ties count half)."""
    to_generated = nearest(heldout_features, generated)[0][:, 0]
    to_real = nearest(heldout_features, real)[0][:, 0]
    return float(np.mean((to_generated < to_real) + 0.5 * (to_generated == to_real)))


@dataclass
class MemorisationCheck:
    """Generated images a batch at a time; keeps each sample's nearest-training figures and the
    pixels of the `shown` closest pairs only."""

    real: RealSets
    shown: int = 8
    closest: list[Closest] = field(default_factory=list)
    pairs: list[tuple[float, np.ndarray, int]] = field(default_factory=list)  # (rmse, sample, train index)
    seen: int = 0

    def add(self, images_uint8: np.ndarray, features: np.ndarray) -> None:
        found = self.real.closest(images_uint8, features)
        self.closest.append(found)
        for i in np.argsort(found.pixel_rmse)[: self.shown]:
            self.pairs.append((float(found.pixel_rmse[i]), images_uint8[i].copy(), int(found.train_index[i])))
        self.pairs = sorted(self.pairs, key=lambda p: p[0])[: self.shown]
        self.seen += len(images_uint8)

    def result(self) -> dict:
        feature = np.concatenate([c.feature_distance for c in self.closest]) if self.closest else np.zeros(0)
        pixel = np.concatenate([c.pixel_rmse for c in self.closest]) if self.closest else np.zeros(0)
        tau_f, tau_p = self.real.thresholds
        closer = feature < tau_f
        return {
            "closer_than_real": float(closer.mean()) if len(feature) else None,
            "copies": float((closer & (pixel < tau_p)).mean()) if len(feature) else None,
            "expected": self.real.quantile,
            "candidates": self.real.candidates,
            "feature_threshold": tau_f,
            "pixel_threshold": tau_p,
            "median_distance": float(np.median(feature)) if len(feature) else None,
            "heldout_median_distance": self.real.heldout_median_distance,
            "closest_pairs": [{"pixel_rmse": round(r, 4), "train_index": j} for r, _, j in self.pairs],
        }

    def pairs_image(self, scale: int = 2) -> Image.Image | None:
        """The closest pairs side by side: a row per pair, the sample left, its nearest training
        image right (each upscaled `scale` times, nearest neighbour)."""
        if not self.pairs:
            return None
        rows = []
        for _, sample, j in self.pairs:
            gap = np.full((sample.shape[0], 2, 3), 255, np.uint8)
            rows.append(np.concatenate([sample, gap, self.real.train[j]], axis=1))
            rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
        grid = np.concatenate(rows[:-1])
        return Image.fromarray(grid.repeat(scale, 0).repeat(scale, 1))

"""Fréchet distance between feature Gaussians (FID, Heusel et al. 2017), and the training
set's reference statistics, cached.

    d² = |mu1 - mu2|² + tr S1 + tr S2 - 2 tr sqrt(S1 S2)

is the squared 2-Wasserstein distance between two Gaussians. The matrix square root is where
implementations differ: scipy's `sqrtm` of the non-symmetric S1 S2 can return complex parts
and needs an epsilon fudge when S1 is singular (fewer images than dimensions). Here S1 = F F^T
with F = V sqrt(w) from `eigh` (eigenvalues at rounding level dropped, so F has S1's rank r
columns), and S1 S2 = F (F^T S2) has the same nonzero eigenvalues as F^T S2 F (XY and YX always
do). That r x r matrix is symmetric PSD: its eigenvalues come from `eigvalsh`, real, rounding
noise below zero clipped, and tr sqrt(S1 S2) is the sum of their square roots. This is
sum sqrt(eigvalsh(sqrt(S1) S2 sqrt(S1))) without the D x D problem when r < D. No scipy, no
epsilon.

The reference side (the training shards at one resolution) is the expensive half of every
evaluation, so it is computed once per (shard set, resolution, feature network, image count)
and cached under a content hash of exactly those.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from sfumato.config import content_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # numpy fields: compare them explicitly
class Statistics:
    """Mean and covariance of one image set's features, and which network made them."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    count: int
    features: str  # the extractor's name

    @cached_property
    def sigma_factor(self) -> np.ndarray:
        """F [D, r] with F F^T = sigma, r its numerical rank (eigenvalues below numpy's
        matrix_rank tolerance dropped). Cached: at 2048 dims the eigendecomposition is the
        costly part of a distance, and one reference meets many sample sets."""
        values, vectors = np.linalg.eigh((self.sigma + self.sigma.T) / 2)
        keep = values > values.max(initial=0.0) * len(values) * np.finfo(np.float64).eps
        return vectors[:, keep] * np.sqrt(values[keep])

    def save(self, path: Path) -> None:
        """Write .safetensors or .npz atomically (a temp file renamed into place)."""
        from sfumato.layout import commit_file, temporary_sibling

        path = Path(path)
        tmp = temporary_sibling(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(
                {"mu": np.ascontiguousarray(self.mu), "sigma": np.ascontiguousarray(self.sigma)},
                str(tmp),
                metadata={"count": str(self.count), "features": self.features},
            )
        elif path.suffix == ".npz":
            with tmp.open("wb") as fh:  # a file object: np.savez would append .npz to a name
                np.savez(fh, mu=self.mu, sigma=self.sigma, count=np.int64(self.count), features=np.str_(self.features))
        else:
            raise ValueError(f"{path}: statistics are saved as .safetensors or .npz")
        commit_file(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Statistics:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                if "features" not in meta or "count" not in meta:
                    raise ValueError(f"{path} has no 'features'/'count' metadata: not sfumato statistics")
                return cls(fh.get_tensor("mu"), fh.get_tensor("sigma"), int(meta["count"]), meta["features"])
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                missing = {"mu", "sigma", "count", "features"} - set(data.files)
                if missing:
                    raise ValueError(f"{path} lacks {sorted(missing)}: not sfumato statistics")
                return cls(data["mu"], data["sigma"], int(data["count"]), str(data["features"]))
        raise ValueError(f"{path}: statistics are read from .safetensors or .npz")


def statistics(features: np.ndarray, name: str = "") -> Statistics:
    """Sample mean and (unbiased) covariance of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features [N >= 2, D], got shape {features.shape}")
    return Statistics(features.mean(0), np.atleast_2d(np.cov(features, rowvar=False)), len(features), name)


class RunningStatistics:
    """The same statistics from batches, in O(D²) memory instead of O(N·D): sums of features
    and outer products, shifted by the first batch's mean so float64 does not cancel."""

    def __init__(self, name: str):
        self.name, self.count, self.shift, self.total, self.outer = name, 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = features.mean(0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((len(self.shift), len(self.shift)))
        centred = features - self.shift
        self.total += centred.sum(0)
        self.outer += centred.T @ centred
        self.count += len(features)

    def result(self) -> Statistics:
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.count}")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return Statistics(self.shift + mean, sigma, self.count, self.name)


def _factored_first(a: Statistics, b: Statistics) -> tuple[Statistics, Statistics]:
    """tr sqrt(S1 S2) = tr sqrt(S2 S1): factor the side already factored, else the one with
    fewer images (rank <= images - 1, so the smaller eigenvalue problem)."""
    cached_a, cached_b = "sigma_factor" in vars(a), "sigma_factor" in vars(b)
    if cached_a != cached_b:
        return (a, b) if cached_a else (b, a)
    return (a, b) if a.count <= b.count else (b, a)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """Squared Fréchet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma)."""
    if a.features != b.features:
        raise ValueError(
            f"statistics from different feature networks are not comparable: "
            f"'{a.features}' vs '{b.features}' (recompute one side with the other's network)"
        )
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    factored, other = _factored_first(a, b)
    small = factored.sigma_factor.T @ other.sigma @ factored.sigma_factor  # [r, r]
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2) if small.size else np.zeros(0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = a.mu - b.mu
    distance = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # a true distance; below zero only by rounding


def reference_statistics(
    shards_dir: Path, resolution_px: int, extractor, max_images: int | None, cache_dir: Path, batch_size: int = 64
) -> Statistics:
    """Statistics of the training shards' images at `resolution_px` (in shard order, the first
    `max_images`), loaded from `cache_dir` when the same shards, network and count were done."""
    # Imported here: the shard modules import Ray, which the distance itself does not need.
    from sfumato.data.loader import iter_batches_from, iter_samples, shard_paths
    from sfumato.layout import ShardFolder

    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images={max_images}: a covariance needs at least 2 images")
    shards_dir = Path(shards_dir)
    paths = shard_paths(shards_dir, resolution_px)
    with ShardFolder(shards_dir).manifest.open() as fh:  # sizes and sha256 per tar: the content
        shards = [row for row in csv.DictReader(fh) if int(row["resolution_px"]) == resolution_px]
    key = content_hash(shards, resolution_px, extractor.name, max_images)
    cache = Path(cache_dir) / f"reference-{resolution_px}px-{key}.safetensors"
    if cache.exists():
        log.info("reference statistics: cached %s", cache)
        return Statistics.load(cache)
    running = RunningStatistics(extractor.name)
    for batch in iter_batches_from(iter_samples(paths), batch_size, resolution_px, drop_last=False):
        images = batch["image"]
        if max_images is not None:
            images = images[: max_images - running.count]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        running.add(extractor(pixels))
        if max_images is not None and running.count >= max_images:
            break
    if max_images is not None and running.count < max_images:
        log.warning(
            "reference statistics: only %d images at %dpx in %s (max_images %d)",
            running.count,
            resolution_px,
            shards_dir,
            max_images,
        )
    stats = running.result()
    cache.parent.mkdir(parents=True, exist_ok=True)
    stats.save(cache)
    log.info("reference statistics: %d images at %dpx, %s -> %s", stats.count, resolution_px, extractor.name, cache)
    return stats

"""Stream training batches from the WebDataset shards of one resolution.

Every worker of a data-parallel job reads a disjoint, deterministic slice: shard i goes to rank
i % world_size. Tars are read sequentially ("r|"), one sample at a time, so memory holds one
batch, never a shard. `smoke()` is what `sfumato dataloader` runs to measure samples/s.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import tarfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from sfumato.layout import DataFolder, ShardFolder

IMAGE_EXTS = ("png", "jpg", "webp")


def shard_paths(shards_dir: Path, resolution_px: int) -> list[Path]:
    """The completed shards of one resolution, as listed in shard_manifest.csv."""
    manifest = ShardFolder(shards_dir).manifest
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} does not exist: run `sfumato shards` first")
    with manifest.open() as fh:
        paths = [shards_dir / r["shard"] for r in csv.DictReader(fh) if int(r["resolution_px"]) == resolution_px]
    if not paths:
        raise ValueError(f"{manifest} lists no shards at {resolution_px}px")
    return sorted(paths)


def iter_samples(paths: list[Path]) -> Iterator[dict]:
    """Samples as dicts of extension -> bytes, plus '__key__', in shard order."""
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:
            current: dict = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(member).read()
            if current:
                yield current


def _center(img: Image.Image, res: int) -> Image.Image:
    if img.size == (res, res):
        return img
    left, top = (img.width - res) // 2, (img.height - res) // 2
    return img.crop((left, top, left + res, top + res))


def iter_batches(paths: list[Path], batch_size: int, resolution_px: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True) -> Iterator[dict]:
    """Batches {"image": uint8 [B,H,W,3], "class": int64 [B] (-1: none), "caption", "id"}."""
    return iter_batches_from(iter_samples(paths[rank::world_size]), batch_size, resolution_px, drop_last)


def iter_batches_from(samples: Iterator[dict], batch_size: int, resolution_px: int,
                      drop_last: bool = True) -> Iterator[dict]:
    images, classes, captions, ids = [], [], [], []
    for sample in samples:
        data = next(sample[e] for e in IMAGE_EXTS if e in sample)
        meta = json.loads(sample["json"])
        images.append(np.asarray(_center(Image.open(io.BytesIO(data)).convert("RGB"), resolution_px)))
        classes.append(int(sample["cls"]) if "cls" in sample else -1)
        captions.append(meta.get("caption") or "")
        ids.append(meta["id"])
        if len(images) == batch_size:
            yield {"image": np.stack(images), "class": np.asarray(classes, np.int64), "caption": captions, "id": ids}
            images, classes, captions, ids = [], [], [], []
    if images and not drop_last:
        yield {"image": np.stack(images), "class": np.asarray(classes, np.int64), "caption": captions, "id": ids}


def split_position(sample_id: str) -> float:
    """A sample's fixed place in [0, 1), from a hash of its id. Held-out samples are those below
    the holdout fraction, so the split is the same whatever the shards' order, the resolution,
    the worker count or the run; a data fraction takes the next slice above it."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big") / 2**64


def training_range(holdout_fraction: float = 0.0, data_fraction: float = 1.0) -> tuple[float, float]:
    """The [low, high) range of split positions that training reads."""
    return holdout_fraction, holdout_fraction + (1.0 - holdout_fraction) * data_fraction


def _in_range(samples: Iterator[dict], low: float, high: float) -> Iterator[dict]:
    for sample in samples:
        if low <= split_position(json.loads(sample["json"])["id"]) < high:
            yield sample


def validation_batches(paths: list[Path], resolution_px: int, holdout_fraction: float, max_samples: int,
                       batch_size: int) -> list[dict]:
    """The held-out samples (split position below `holdout_fraction`) of these shards, in shard
    order, up to `max_samples`, as batches (the last one may be smaller)."""
    held_out = itertools.islice(_in_range(iter_samples(sorted(paths)), 0.0, holdout_fraction), max_samples)
    batches = list(iter_batches_from(held_out, batch_size, resolution_px, drop_last=False))
    if not batches:
        raise ValueError(f"no held-out sample among the {len(paths)} shards at {resolution_px}px: raise "
                         "train.validation.holdout_fraction")
    return batches


def _balanced(samples: Iterator[dict], weights: dict[int, float], rng: np.random.Generator) -> Iterator[dict]:
    for sample in samples:
        cls = int(sample["cls"]) if "cls" in sample else -1
        if cls < 0 or rng.random() < weights.get(cls, 1.0):
            yield sample


def iter_training_batches(paths: list[Path], batch_size: int, resolution_px: int, rank: int, world_size: int,
                          seed: int, position: dict | None = None,
                          class_weights: dict[int, float] | None = None,
                          split: tuple[float, float] = (0.0, 1.0)) -> Iterator[tuple[dict, dict]]:
    """Endless batches for one rank, epoch after epoch: the shard order is reshuffled per epoch
    from (seed, epoch), then dealt round-robin to ranks. Yields (batch, position after it);
    given a saved position, it resumes at exactly the next batch (skipped samples are not
    decoded). Only samples whose split position is in `split` (`training_range`) are read. With
    `class_weights`, samples are kept with their class's probability, drawn from
    (seed, epoch, rank), so a resumed run keeps exactly the same ones."""
    if len(paths) < world_size:
        raise ValueError(f"{len(paths)} shards at {resolution_px}px cannot feed {world_size} workers: "
                         "lower data.shards.samples_per_shard")
    epoch = (position or {}).get("epoch", 0)
    skip = (position or {}).get("batches", 0)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        mine = [paths[i] for i in order][rank::world_size]
        samples = iter_samples(mine)
        if split != (0.0, 1.0):
            samples = _in_range(samples, *split)
        if class_weights is not None:
            samples = _balanced(samples, class_weights, np.random.default_rng([seed, epoch, rank, 1]))
        for _ in range(skip * batch_size):
            next(samples, None)
        done = skip
        for batch in iter_batches_from(samples, batch_size, resolution_px):
            done += 1
            yield batch, {"epoch": epoch, "batches": done}
        if done == 0:
            raise ValueError(f"rank {rank} got no full batch of {batch_size} from its shards at {resolution_px}px: "
                             "lower the micro batch or data.shards.samples_per_shard")
        epoch, skip = epoch + 1, 0


def smoke(cfg) -> dict:
    """Stream `loader.smoke_batches` batches (cycling over the shards) and report samples/s."""
    res = cfg.data.loader.resolution_px or cfg.data.shards.resolutions_px[0]
    paths = shard_paths(DataFolder(cfg.data.output_dir).shards, res)
    want, batch_size = cfg.data.loader.smoke_batches, cfg.data.loader.batch_size
    batches = samples = 0
    start = time.perf_counter()
    while batches < want:
        produced = 0
        for batch in iter_batches(paths, batch_size, res, drop_last=False):
            batches += 1
            produced += 1
            samples += len(batch["id"])
            if batches == want:
                break
        if produced == 0:
            raise ValueError(f"the shards at {res}px hold no samples")
    seconds = time.perf_counter() - start
    return {"resolution_px": res, "batches": batches, "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1), "shards": len(paths)}

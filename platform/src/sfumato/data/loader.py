"""Stream training batches from the WebDataset shards of one resolution.

Every worker of a data-parallel job reads a disjoint, deterministic slice: shard i goes to rank
i % world_size. Tars are read sequentially ("r|"), one sample at a time, so memory holds one
batch, never a shard. `smoke()` is what `sfumato dataloader` runs to measure samples/s.

Training batches come in one of three kinds, one iterator class each, each with a small JSON
position that resumes it exactly: square crops in shard order (`SquareBatches`), single-aspect-
bucket batches (`BucketBatches`, data.shards.buckets) and a weighted mixture of sources
(`MixtureBatches`, data.sources[i].weight). All three read what a `ReadPlan` says one rank reads;
`training_batches` picks the kind the config asks for. Readers that want squares (validation
without buckets, FID references, the domain classifier) get a centre crop of a bucketed image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sfumato.data.decode import cover_crop
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
    if min(img.size) < res:  # a bucket narrower than the resolution (data.shards.buckets)
        return cover_crop(img, res, res)
    left, top = (img.width - res) // 2, (img.height - res) // 2
    return img.crop((left, top, left + res, top + res))


def _as_batch(samples: list[dict], resolution_px: int | None) -> dict:
    """Decoded samples as a batch; resolution_px None: images at their stored size (one bucket's)."""
    images, classes, captions, ids = [], [], [], []
    for sample in samples:
        data = next(sample[e] for e in IMAGE_EXTS if e in sample)
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        images.append(np.asarray(image if resolution_px is None else _center(image, resolution_px)))
        classes.append(int(sample["cls"]) if "cls" in sample else -1)
        captions.append(meta.get("caption") or "")
        ids.append(meta["id"])
    return {"image": np.stack(images), "class": np.asarray(classes, np.int64), "caption": captions, "id": ids}


def iter_batches(
    paths: list[Path], batch_size: int, resolution_px: int, rank: int = 0, world_size: int = 1, drop_last: bool = True
) -> Iterator[dict]:
    """Batches {"image": uint8 [B,H,W,3], "class": int64 [B] (-1: none), "caption", "id"}."""
    return iter_batches_from(iter_samples(paths[rank::world_size]), batch_size, resolution_px, drop_last)


def iter_batches_from(
    samples: Iterator[dict], batch_size: int, resolution_px: int, drop_last: bool = True
) -> Iterator[dict]:
    """Square batches (centre crops of `resolution_px`) in the samples' order."""
    pending = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield _as_batch(pending, resolution_px)
            pending = []
    if pending and not drop_last:
        yield _as_batch(pending, resolution_px)


def split_position(sample_id: str) -> float:
    """A sample's fixed place in [0, 1), from a hash of its id. Held-out samples are those below
    the holdout fraction, so the split is the same whatever the shards' order, the resolution,
    the worker count or the run; a data fraction takes the next slice above it."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big") / 2**64


def training_range(holdout_fraction: float = 0.0, data_fraction: float = 1.0) -> tuple[float, float]:
    """The [low, high) range of split positions that training reads."""
    return holdout_fraction, holdout_fraction + (1.0 - holdout_fraction) * data_fraction


def _in_range(samples: Iterator[dict], low: float, high: float, ids: frozenset | None = None) -> Iterator[dict]:
    """The samples whose split position is in [low, high) and, given `ids` (a fine-tune's
    selection, sfumato.train.finetune), whose id is one of them."""
    for sample in samples:
        sample_id = json.loads(sample["json"])["id"]
        if low <= split_position(sample_id) < high and (ids is None or sample_id in ids):
            yield sample


def validation_batches(
    paths: list[Path],
    resolution_px: int,
    holdout_fraction: float,
    max_samples: int,
    batch_size: int,
    bucketed: bool = False,
    ids: frozenset | None = None,
) -> list[dict]:
    """The held-out samples (split position below `holdout_fraction`; of `ids` only, if given) of
    these shards, in shard order, up to `max_samples`, as batches (the last one may be smaller;
    `bucketed`: one bucket's images per batch, at their size)."""
    held_out = itertools.islice(_in_range(iter_samples(sorted(paths)), 0.0, holdout_fraction, ids), max_samples)
    if bucketed:
        batches = [_as_batch(group, None) for group, _, _ in _bucket_groups(held_out, batch_size)]
    else:
        batches = list(iter_batches_from(held_out, batch_size, resolution_px, drop_last=False))
    if not batches:
        raise ValueError(
            f"no held-out sample among the {len(paths)} shards at {resolution_px}px: raise "
            "train.validation.holdout_fraction"
        )
    return batches


def _balanced(samples: Iterator[dict], weights: dict[int, float], rng: np.random.Generator) -> Iterator[dict]:
    for sample in samples:
        cls = int(sample["cls"]) if "cls" in sample else -1
        if cls < 0 or rng.random() < weights.get(cls, 1.0):
            yield sample


# ----------------------------------------------------------------------- training batches
@dataclass(frozen=True)
class ReadPlan:
    """What one rank of a training run reads, whatever the batches it makes of it: the shards of
    one resolution, its place among the ranks, the seed its orders come from, the [low, high)
    range of split positions it trains on (`training_range`), `ids` (a fine-tune's selection:
    only these samples) and `class_weights` (class -> probability of keeping a sample, drawn
    from (seed, epoch, rank), so a resumed run keeps exactly the same ones)."""

    paths: list[Path]
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    split: tuple[float, float] = (0.0, 1.0)
    ids: frozenset | None = None
    class_weights: dict[int, float] | None = None

    def in_split(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The samples in the split (and in the selection)."""
        if self.split == (0.0, 1.0) and self.ids is None:
            return samples
        return _in_range(samples, *self.split, self.ids)

    def balanced(self, samples: Iterator[dict], *stream: int) -> Iterator[dict]:
        """With class weights: each sample kept with its class's probability, drawn from the random
        stream (seed, *stream)."""
        if self.class_weights is None:
            return samples
        return _balanced(samples, self.class_weights, np.random.default_rng([self.seed, *stream]))

    def epoch_samples(self, epoch: int) -> Iterator[dict]:
        """One epoch's samples for this rank: the shard order reshuffled from (seed, epoch), then
        dealt round-robin to ranks. A selection may sit in a few shards (a class, a source):
        then every rank reads every shard and takes every world_size-th selected sample (reading
        is cheap, decoding is not)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        shuffled = [self.paths[i] for i in order]
        samples = self.in_split(iter_samples(shuffled[self.rank :: self.world_size] if self.ids is None else shuffled))
        if self.ids is not None:
            samples = (sample for i, sample in enumerate(samples) if i % self.world_size == self.rank)
        return self.balanced(samples, epoch, self.rank, 1)

    def check_enough_shards(self, resolution_px: int) -> None:
        if len(self.paths) < self.world_size and self.ids is None:
            raise ValueError(
                f"{len(self.paths)} shards at {resolution_px}px cannot feed {self.world_size} workers: "
                "lower data.shards.samples_per_shard"
            )


class SquareBatches:
    """Endless square batches (centre crops) for one rank, epoch after epoch, in shard order
    (`ReadPlan.epoch_samples`). Yields (batch, position after it: {"epoch", "batches"}); from a
    saved position it resumes at exactly the next batch (skipped samples are not decoded)."""

    def __init__(self, plan: ReadPlan, batch_size: int, resolution_px: int, position: dict | None = None):
        self.plan, self.batch_size, self.resolution_px, self.position = plan, batch_size, resolution_px, position or {}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        self.plan.check_enough_shards(self.resolution_px)
        epoch, skip = self.position.get("epoch", 0), self.position.get("batches", 0)
        while True:
            samples = self.plan.epoch_samples(epoch)
            for _ in range(skip * self.batch_size):
                next(samples, None)
            done = skip
            for batch in iter_batches_from(samples, self.batch_size, self.resolution_px):
                done += 1
                yield batch, {"epoch": epoch, "batches": done}
            if done == 0:
                raise ValueError(
                    f"rank {self.plan.rank} got no full batch of {self.batch_size} from its shards at "
                    f"{self.resolution_px}px: lower the micro batch or data.shards.samples_per_shard"
                )
            epoch, skip = epoch + 1, 0


class BucketBatches:
    """Endless single-aspect-bucket batches (data.shards.buckets; `_bucket_groups`) for one rank,
    images at their stored size, in shard order. The position also counts the samples read in
    the epoch ({"epoch", "batches", "samples"}), to refill the part-filled groups on resume."""

    def __init__(self, plan: ReadPlan, batch_size: int, resolution_px: int, position: dict | None = None):
        self.plan, self.batch_size, self.resolution_px, self.position = plan, batch_size, resolution_px, position or {}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        self.plan.check_enough_shards(self.resolution_px)
        epoch, skip = self.position.get("epoch", 0), self.position.get("batches", 0)
        while True:
            done = 0
            read = self.position.get("samples", 0) if skip else 0
            for group, done, read_then in _bucket_groups(self.plan.epoch_samples(epoch), self.batch_size, read, skip):
                yield _as_batch(group, None), {"epoch": epoch, "batches": done, "samples": read_then}
            done = max(done, skip)
            epoch, skip = epoch + 1, 0
            if done == 0:
                raise ValueError(f"rank {self.plan.rank} got no sample from its shards at {self.resolution_px}px")


def training_batches(
    plan: ReadPlan,
    batch_size: int,
    resolution_px: int,
    position: dict | None = None,
    source_weights: dict[str, float] | None = None,
    bucketed: bool = False,
):
    """The iterator of (batch, position) the data config asks for: a weighted mixture of sources
    (data.sources weights), single-bucket batches (data.shards.buckets), or squares."""
    if source_weights is not None:
        return MixtureBatches(plan, batch_size, resolution_px, source_weights, position, bucketed)
    return (BucketBatches if bucketed else SquareBatches)(plan, batch_size, resolution_px, position)


def iter_training_batches(
    paths: list[Path],
    batch_size: int,
    resolution_px: int,
    rank: int,
    world_size: int,
    seed: int,
    position: dict | None = None,
    class_weights: dict[int, float] | None = None,
    split: tuple[float, float] = (0.0, 1.0),
    source_weights: dict[str, float] | None = None,
    bucketed: bool = False,
    ids: frozenset | None = None,
) -> Iterator[tuple[dict, dict]]:
    """`training_batches` with the plan's fields as arguments: an iterator, for benches and tests."""
    plan = ReadPlan(paths, rank, world_size, seed, split, ids, class_weights)
    return iter(training_batches(plan, batch_size, resolution_px, position, source_weights, bucketed))


# --------------------------------------------------------------------- aspect-ratio buckets
def _bucket_groups(
    samples: Iterator[dict], batch_size: int, skip_samples: int = 0, skip_batches: int = 0
) -> Iterator[tuple[list[dict], int, int]]:
    """One epoch's samples in single-bucket groups: a bucket's group goes out as soon as it holds
    `batch_size` samples, and when the samples run out the part-filled ones go out too, smaller,
    narrowest bucket first, so every sample is in exactly one group per epoch. Yields (group,
    groups so far, samples read so far); the order depends on the samples' order alone.

    Resuming after a saved (groups, samples read): the first `skip_samples` samples are read again
    but not decoded, only to refill the part-filled groups they left (at most buckets x
    (batch - 1) samples held), and the groups that went out before are not yielded again."""
    pending: dict[tuple[int, int], list[dict]] = {}
    read = done = 0
    for sample in samples:
        read += 1
        bucket = tuple(json.loads(sample["json"])["bucket_px"])
        group = pending.setdefault(bucket, [])
        group.append(sample)
        if len(group) == batch_size:
            del pending[bucket]
            done += 1
            if read > skip_samples:
                yield group, done, read
    for bucket in sorted(pending, key=lambda b: b[0] / b[1]):
        done += 1
        if done > skip_batches:
            yield pending[bucket], done, read


# ------------------------------------------------------------------------- source mixture
def _source_key(name: str) -> int:
    """A source's fixed part of its random streams' seeds: from its name, not its place in the
    config, so reordering the sources changes nothing."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")


def _shards_holding(paths: list[Path], name: str) -> tuple[list[Path], bool]:
    """The shards with samples of source `name`, from their sidecars' per-source counts, and
    whether those counts were known for all of them (shards written before they were recorded
    may hold it: all of them are read, and the per-sample filter does the work)."""
    held, known = [], True
    for path in paths:
        sidecar = ShardFolder.sidecar(path)
        counts = json.loads(sidecar.read_text()).get("sources") if sidecar.exists() else None
        known = known and counts is not None
        if counts is None or counts.get(name, 0) > 0:
            held.append(path)
    return held, known


def _source_epoch(plan: ReadPlan, name: str, held: tuple[list[Path], bool], epoch: int) -> Iterator[dict]:
    """One epoch of one source's samples for one rank: the shards holding it (`_shards_holding`)
    in an order from (seed, epoch, source), dealt to ranks like `ReadPlan.epoch_samples` deals all
    shards; a source in fewer shards than ranks, or in shards whose per-source counts are unknown,
    has its samples dealt instead, so every rank gets its share."""
    (paths, known), key = held, _source_key(name)
    rank, world_size = plan.rank, plan.world_size
    order = np.random.default_rng([plan.seed, epoch, key]).permutation(len(paths))
    shuffled = [paths[i] for i in order]
    by_shard = known and len(paths) >= world_size
    samples = (
        s
        for s in iter_samples(shuffled[rank::world_size] if by_shard else shuffled)
        if json.loads(s["json"]).get("source") == name
    )
    if not by_shard:
        samples = (s for i, s in enumerate(samples) if i % world_size == rank)
    return plan.balanced(plan.in_split(samples), epoch, rank, 1, key)


def _no_sample(name: str, rank: int, paths: list[Path]) -> ValueError:
    return ValueError(
        f"source {name!r} has no training sample for rank {rank} in its {len(paths)} shards: "
        "give it weight 0, or lower train.validation.holdout_fraction / raise train.data_fraction"
    )


def _source_samples(plan: ReadPlan, name: str, held: tuple[list[Path], bool], state: dict) -> Iterator[dict]:
    """One source's samples for one rank, epoch after epoch. `state` ({"epoch", "samples"}:
    samples taken in that epoch) is kept current as samples are taken, and resumed from."""
    while True:
        epoch, taken = state["epoch"], 0
        for taken, sample in enumerate(_source_epoch(plan, name, held, epoch), start=1):
            if taken > state["samples"]:  # the ones before were taken before the saved position
                state["samples"] = taken
                yield sample
        if taken == 0:
            raise _no_sample(name, plan.rank, held[0])
        state["epoch"], state["samples"] = epoch + 1, 0


def _source_groups(
    plan: ReadPlan, name: str, held: tuple[list[Path], bool], batch_size: int, state: dict
) -> Iterator[list[dict]]:
    """One source's single-bucket groups for one rank (`_bucket_groups`), epoch after epoch;
    `state` ({"epoch", "batches", "samples"} of that epoch) is kept current and resumed from."""
    while True:
        epoch, skip = state["epoch"], state["batches"]
        samples = _source_epoch(plan, name, held, epoch)
        # The loop keeps `state` current as it goes; the generator read its start values once, above.
        groups = _bucket_groups(samples, batch_size, state["samples"], skip)
        for group, state["batches"], state["samples"] in groups:
            yield group
        if state["batches"] == 0:
            raise _no_sample(name, plan.rank, held[0])
        state.update(epoch=epoch + 1, batches=0, samples=0)


def _source_draws(seed: int, rank: int, done: int, weights: np.ndarray) -> Iterator[int]:
    """The source index of each sample this rank takes, drawn with `weights`, from draw `done`
    on. PCG64 jumps ahead in O(log n), so resuming after a billion draws costs nothing."""
    bits = np.random.PCG64([seed, rank, 2])
    bits.advance(done)  # one 64-bit output per uniform double
    generator, edges = np.random.Generator(bits), np.cumsum(weights)
    edges[-1] = 1.0  # rounding never lets a draw fall past the last source
    while True:
        yield from np.searchsorted(edges, generator.random(1024), side="right").tolist()


class MixtureBatches:
    """Endless batches whose every sample's source is drawn with `source_weights` (e.g. 90% real
    photos, 10% synthetic), whatever the sources' sizes: each source is its own endless stream of
    epochs, so a small source repeats and a large one is read in part. The position holds, per
    source, its epoch, the samples taken in it and the samples drawn so far ("drawn": the
    realised shares, `source_shares`), and resumes exactly without reading the epochs before it
    again. `bucketed`: each batch's source is drawn instead (a batch holds one source's one
    bucket), from every source's own single-bucket groups (`_source_groups`)."""

    def __init__(
        self,
        plan: ReadPlan,
        batch_size: int,
        resolution_px: int,
        source_weights: dict[str, float],
        position: dict | None = None,
        bucketed: bool = False,
    ):
        self.plan, self.batch_size, self.resolution_px, self.bucketed = plan, batch_size, resolution_px, bucketed
        self.source_weights, self.position = source_weights, position or {}
        self.names = [name for name, weight in source_weights.items() if weight > 0]
        weights = np.asarray([source_weights[name] for name in self.names], dtype=np.float64)
        self.weights = weights / weights.sum()

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        saved = self.position.get("sources", {})
        states = {n: {"epoch": 0, "samples": 0, "drawn": 0, **saved.get(n, {})} for n in self.names}
        held = {n: _shards_holding(self.plan.paths, n) for n in self.names}
        for name in self.names:
            if not held[name][0]:
                raise ValueError(
                    f"no shard at {self.resolution_px}px holds source {name!r} (data.sources weight "
                    f"{self.source_weights[name]:.3g}): re-run `sfumato shards`, or give it weight 0"
                )
        done = self.position.get("batches", 0)
        yield from (self._groups if self.bucketed else self._squares)(states, held, done)

    def _squares(self, states: dict, held: dict, done: int) -> Iterator[tuple[dict, dict]]:
        """One draw per sample, from draw `sum(drawn)` on."""
        names, plan = self.names, self.plan
        streams = {n: _source_samples(plan, n, held[n], states[n]) for n in names}

        def mixed() -> Iterator[dict]:
            for index in _source_draws(plan.seed, plan.rank, sum(s["drawn"] for s in states.values()), self.weights):
                states[names[index]]["drawn"] += 1
                yield next(streams[names[index]])

        for batch in iter_batches_from(mixed(), self.batch_size, self.resolution_px):
            done += 1
            yield batch, {"batches": done, "sources": {n: dict(s) for n, s in states.items()}}

    def _groups(self, states: dict, held: dict, done: int) -> Iterator[tuple[dict, dict]]:
        """One draw per batch (draw `done` on, so `done` batches came before)."""
        names, plan = self.names, self.plan
        for state in states.values():
            state.setdefault("batches", 0)
        groups = {n: _source_groups(plan, n, held[n], self.batch_size, states[n]) for n in names}
        for index in _source_draws(plan.seed, plan.rank, done, self.weights):
            group = next(groups[names[index]])
            states[names[index]]["drawn"] += len(group)
            done += 1
            yield _as_batch(group, None), {"batches": done, "sources": {n: dict(s) for n, s in states.items()}}


def source_shares(position: dict | None) -> dict[str, float] | None:
    """The realised share of each source among the samples a mixture position has drawn."""
    sources = (position or {}).get("sources")
    total = sum(s["drawn"] for s in sources.values()) if sources else 0
    return {name: s["drawn"] / total for name, s in sources.items()} if total else None


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
    return {
        "resolution_px": res,
        "batches": batches,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "shards": len(paths),
    }

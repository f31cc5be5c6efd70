"""The training loader on real CIFAR-10 JPEGs in WebDataset tars: ranks see disjoint slices,
a saved position resumes at exactly the next batch, and class balancing evens out a skewed set."""

import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from sfumato.data.loader import iter_training_batches
from sfumato.data.shards import balancing_weights, tar_add


@pytest.fixture(scope="module")
def skewed_shards(cifar_dir, tmp_path_factory):
    """8 shards of 32x32 JPEGs: class 0 (airplane) 9 times as frequent as class 1 (automobile)."""
    out = tmp_path_factory.mktemp("skewed")
    planes = sorted((cifar_dir / "airplane").glob("*.jpg"))
    cars = sorted((cifar_dir / "automobile").glob("*.jpg"))
    samples = [(planes[i % len(planes)], 0) for i in range(360)] + [(cars[i % len(cars)], 1) for i in range(40)]
    np.random.default_rng(0).shuffle(samples)
    paths = []
    for shard in range(8):
        path = out / f"{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in range(shard * 50, shard * 50 + 50):
                image, cls = samples[key]
                tar_add(tar, f"{key:09d}.jpg", image.read_bytes())
                tar_add(tar, f"{key:09d}.json", json.dumps({"id": f"s{key}", "caption": ""}).encode())
                tar_add(tar, f"{key:09d}.cls", str(cls).encode())
        paths.append(path)
    return paths


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_ranks_are_disjoint_and_resume_is_exact(skewed_shards):
    ids = [
        set(i for b, _ in _take(iter_training_batches(skewed_shards, 10, 32, r, 2, seed=3), 20) for i in b["id"])
        for r in range(2)
    ]
    assert len(ids[0]) == len(ids[1]) == 200 and not ids[0] & ids[1], "one epoch: each rank its own half"
    straight = _take(iter_training_batches(skewed_shards, 10, 32, 0, 2, seed=3), 30)
    position = straight[12][1]
    resumed = _take(iter_training_batches(skewed_shards, 10, 32, 0, 2, seed=3, position=position), 17)
    assert [b["id"] for b, _ in resumed] == [b["id"] for b, _ in straight[13:]]


def test_class_balancing_evens_out_a_skewed_set(skewed_shards):
    by_tag = balancing_weights({"airplane": 360, "automobile": 40})
    assert by_tag == {"airplane": pytest.approx(40 / 360), "automobile": 1.0}
    weights = {0: by_tag["airplane"], 1: by_tag["automobile"]}
    plain = Counter(
        c for b, _ in _take(iter_training_batches(skewed_shards, 8, 32, 0, 1, seed=0), 100) for c in b["class"]
    )
    assert plain[0] / plain[1] > 6
    it = iter_training_batches(skewed_shards, 8, 32, 0, 1, seed=0, class_weights=weights)
    batches = _take(it, 100)
    balanced = Counter(c for b, _ in batches for c in b["class"])
    assert 0.7 < balanced[0] / balanced[1] < 1.4, balanced
    # The subsampling is part of the position: resuming gives the same batches.
    resumed = iter_training_batches(skewed_shards, 8, 32, 0, 1, seed=0, position=batches[49][1], class_weights=weights)
    assert [b["id"] for b, _ in _take(resumed, 50)] == [b["id"] for b, _ in batches[50:]]


def test_held_out_samples_never_reach_training_and_a_data_fraction_takes_a_stable_subset(skewed_shards):
    from sfumato.data.loader import split_position, training_range, validation_batches

    every_id = {f"s{key}" for key in range(400)}
    held_out = {i for b in validation_batches(skewed_shards, 32, 0.1, 1000, 16) for i in b["id"]}
    assert held_out == {i for i in every_id if split_position(i) < 0.1}
    assert 20 <= len(held_out) <= 60, "about a tenth of the 400 samples"

    def one_epoch(split, rank=0, world=1):
        batches = iter_training_batches(skewed_shards, 5, 32, rank, world, seed=0, split=split)
        seen = []
        for batch, position in batches:
            if position["epoch"] > 0:
                break
            seen += batch["id"]
        return seen

    full = one_epoch(training_range(0.1, 1.0))
    assert not held_out & set(full), "training read a held-out sample"
    assert len(full) >= len(every_id - held_out) - 8 * 5, "only each shard's incomplete last batch is dropped"
    half = one_epoch(training_range(0.1, 0.5))
    assert set(half) <= set(full) and 0.35 < len(half) / len(full) < 0.65
    # The split follows the ids, not the reader: two ranks see the same subset between them.
    two_ranks = one_epoch(training_range(0.1, 0.5), 0, 2) + one_epoch(training_range(0.1, 0.5), 1, 2)
    assert set(two_ranks) <= {i for i in every_id if 0.1 <= split_position(i) < 0.1 + 0.9 * 0.5}


# ------------------------------------------------------------------------- source mixture
@pytest.fixture(scope="module")
def two_source_shards(cifar_dir, tmp_path_factory):
    """9 shards of 40 real JPEGs: 300 of source `photos` then 60 of `synthetic` (manifest order
    is source order, so one shard holds both), each tar with its sidecar's per-source counts."""
    from sfumato.layout import ShardFolder

    out = tmp_path_factory.mktemp("two_sources")
    images = sorted(cifar_dir.glob("*/*.jpg"))
    samples = [("photos", f"p{i}") for i in range(300)] + [("synthetic", f"s{i}") for i in range(60)]
    paths = []
    for shard in range(9):
        path = out / f"{shard:06d}.tar"
        chunk = range(shard * 40, shard * 40 + 40)
        with tarfile.open(path, "w") as tar:
            for key in chunk:
                source, sample_id = samples[key]
                tar_add(tar, f"{key:09d}.jpg", images[key % len(images)].read_bytes())
                tar_add(tar, f"{key:09d}.json", json.dumps({"id": sample_id, "caption": "", "source": source}).encode())
        ShardFolder.sidecar(path).write_text(json.dumps({"sources": Counter(samples[k][0] for k in chunk)}))
        paths.append(path)
    return paths


MIXTURE = {"photos": 0.1, "synthetic": 0.9}  # the small source drawn 9 times as often as the large one


def test_sources_are_drawn_in_their_weights_whatever_their_sizes(two_source_shards):
    from sfumato.data.loader import source_shares

    draws = 0
    for rank in range(2):
        batches = _take(iter_training_batches(two_source_shards, 8, 32, rank, 2, seed=5, source_weights=MIXTURE), 100)
        ids = [i for b, _ in batches for i in b["id"]]
        synthetic = sum(i.startswith("s") for i in ids) / len(ids)
        # 800 draws: the binomial standard deviation of a 0.9 share is 0.011; 4 of them.
        assert abs(synthetic - 0.9) < 4 * (0.9 * 0.1 / len(ids)) ** 0.5, synthetic
        assert source_shares(batches[-1][1]) == {
            "photos": pytest.approx(1 - synthetic),
            "synthetic": pytest.approx(synthetic),
        }
        draws += len(ids)
    assert draws == 1600


def test_each_source_epoch_covers_its_samples_once_across_ranks(two_source_shards):
    """Batches of one sample, so the position after each batch is that sample's source epoch."""
    first_epoch = {}
    for rank in range(2):
        seen = []
        for batch, position in _take(
            iter_training_batches(two_source_shards, 1, 32, rank, 2, seed=5, source_weights=MIXTURE), 200
        ):
            if batch["id"][0].startswith("s") and position["sources"]["synthetic"]["epoch"] == 0:
                seen += batch["id"]
        first_epoch[rank] = seen
    assert not set(first_epoch[0]) & set(first_epoch[1]), "a sample went to both ranks in one epoch"
    assert sorted(first_epoch[0] + first_epoch[1]) == sorted(f"s{i}" for i in range(60)), "each sample once"


def test_a_mixture_resumes_exactly_from_a_small_json_position(two_source_shards):
    straight = _take(iter_training_batches(two_source_shards, 8, 32, 1, 2, seed=5, source_weights=MIXTURE), 40)
    saved = json.loads(json.dumps(straight[15][1]))  # what a checkpoint keeps
    assert len(json.dumps(saved)) < 300, "the position is counters, not sample lists"
    assert saved["sources"]["synthetic"]["epoch"] >= 1, "the small source has started repeating"
    resumed = _take(
        iter_training_batches(two_source_shards, 8, 32, 1, 2, seed=5, position=saved, source_weights=MIXTURE), 24
    )
    assert [b["id"] for b, _ in resumed] == [b["id"] for b, _ in straight[16:]]
    assert [p for _, p in resumed] == [p for _, p in straight[16:]]


# --------------------------------------------------------------------- aspect-ratio buckets
@pytest.fixture(scope="module")
def bucketed_shards(flowers_dir, tmp_path_factory):
    """6 shards of 10 real flower photos of varied aspect ratios, each stored at its nearest
    bucket of 32 px, as the shards stage stores them (render + nearest_bucket); the first 40 of
    source `photos`, the last 20 of `synthetic`."""
    from PIL import Image

    from sfumato.config import BucketsConfig
    from sfumato.data.decode import encode, nearest_bucket, render

    sizes = BucketsConfig(multiple_px=8).sizes(32)
    out = tmp_path_factory.mktemp("bucketed")
    photos = sorted(flowers_dir.glob("*/*.jpg"))[:60]
    paths = []
    for shard in range(6):
        path = out / f"{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in range(shard * 10, shard * 10 + 10):
                image = Image.open(photos[key]).convert("RGB")
                bucket = nearest_bucket(*image.size, sizes)
                tar_add(tar, f"{key:09d}.png", encode(render(image, 32, "center_crop", bucket), "png"))
                source = "photos" if key < 40 else "synthetic"  # no sidecars: a mixture reads every shard
                tar_add(
                    tar,
                    f"{key:09d}.json",
                    json.dumps({"id": f"f{key}", "bucket_px": list(bucket), "source": source}).encode(),
                )
        paths.append(path)
    return paths


def _epoch_batches(paths, rank, world, epoch=0, batch=4, seed=1):
    out = []
    for b, position in iter_training_batches(paths, batch, 32, rank, world, seed=seed, bucketed=True):
        if position["epoch"] > epoch:
            return out
        if position["epoch"] == epoch:
            out.append((b, position))


def test_bucketed_batches_are_single_aspect_and_cover_every_sample_once_per_epoch(bucketed_shards):
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            batches = _epoch_batches(bucketed_shards, rank, 2, epoch)
            for batch, _ in batches:
                assert batch["image"].ndim == 4 and batch["image"].shape[3] == 3
                assert 1 <= len(batch["id"]) <= 4
            seen += [i for b, _ in batches for i in b["id"]]
        assert sorted(seen) == sorted(f"f{k}" for k in range(60)), "each sample once per epoch, over both ranks"
    shapes = {b["image"].shape[1:3] for b, _ in _epoch_batches(bucketed_shards, 0, 1)}
    assert len(shapes) >= 3 and (32, 32) in shapes, f"the photos fill several buckets: {shapes}"
    assert all(h * w == pytest.approx(32 * 32, rel=0.25) for h, w in shapes), "about equal pixel counts"


def test_bucketed_order_follows_the_seed_and_resumes_exactly_mid_epoch(bucketed_shards):
    straight = _take(iter_training_batches(bucketed_shards, 4, 32, 1, 2, seed=1, bucketed=True), 30)
    again = _take(iter_training_batches(bucketed_shards, 4, 32, 1, 2, seed=1, bucketed=True), 30)
    other = _take(iter_training_batches(bucketed_shards, 4, 32, 1, 2, seed=2, bucketed=True), 30)
    assert [b["id"] for b, _ in straight] == [b["id"] for b, _ in again]
    assert [b["id"] for b, _ in straight] != [b["id"] for b, _ in other]
    assert any(len(b["id"]) < 4 for b, _ in straight[:-5]), "the cuts include the part-filled groups closing an epoch"
    for cut in range(25):  # every batch: mid-epoch, in an epoch's closing groups, at an epoch's end
        saved = json.loads(json.dumps(straight[cut][1]))
        resumed = _take(
            iter_training_batches(bucketed_shards, 4, 32, 1, 2, seed=1, position=saved, bucketed=True),
            min(5, 30 - cut - 1),
        )
        assert [b["id"] for b, _ in resumed] == [b["id"] for b, _ in straight[cut + 1 : cut + 1 + len(resumed)]], cut
        assert all(np.array_equal(a["image"], b["image"]) for (a, _), (b, _) in zip(resumed, straight[cut + 1 :]))


def test_a_bucketed_mixture_draws_a_source_per_batch_in_the_weights_and_resumes_exactly(bucketed_shards):
    from sfumato.data.loader import source_shares

    mixture = {"photos": 0.25, "synthetic": 0.75}
    straight = _take(
        iter_training_batches(bucketed_shards, 4, 32, 0, 2, seed=3, source_weights=mixture, bucketed=True), 160
    )
    sources = [{int(i[1:]) >= 40 for i in b["id"]} for b, _ in straight]
    assert all(len(s) == 1 for s in sources), "a batch holds one source"
    synthetic = sum(s == {True} for s in sources) / len(sources)
    assert abs(synthetic - 0.75) < 4 * (0.75 * 0.25 / len(sources)) ** 0.5, synthetic  # 160 draws: sd 0.034
    shares = source_shares(straight[-1][1])
    assert abs(shares["synthetic"] - 0.75) < 0.15, shares  # counted in samples: closing groups are smaller
    for cut in (5, 37, 90):
        saved = json.loads(json.dumps(straight[cut][1]))
        resumed = _take(
            iter_training_batches(
                bucketed_shards, 4, 32, 0, 2, seed=3, position=saved, source_weights=mixture, bucketed=True
            ),
            20,
        )
        assert [b["id"] for b, _ in resumed] == [b["id"] for b, _ in straight[cut + 1 : cut + 21]], cut

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
    ids = [set(i for b, _ in _take(iter_training_batches(skewed_shards, 10, 32, r, 2, seed=3), 20) for i in b["id"])
           for r in range(2)]
    assert len(ids[0]) == len(ids[1]) == 200 and not ids[0] & ids[1], "one epoch: each rank its own half"
    straight = _take(iter_training_batches(skewed_shards, 10, 32, 0, 2, seed=3), 30)
    position = straight[12][1]
    resumed = _take(iter_training_batches(skewed_shards, 10, 32, 0, 2, seed=3, position=position), 17)
    assert [b["id"] for b, _ in resumed] == [b["id"] for b, _ in straight[13:]]


def test_class_balancing_evens_out_a_skewed_set(skewed_shards):
    by_tag = balancing_weights({"airplane": 360, "automobile": 40})
    assert by_tag == {"airplane": pytest.approx(40 / 360), "automobile": 1.0}
    weights = {0: by_tag["airplane"], 1: by_tag["automobile"]}
    plain = Counter(c for b, _ in _take(iter_training_batches(skewed_shards, 8, 32, 0, 1, seed=0), 100) for c in b["class"])
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

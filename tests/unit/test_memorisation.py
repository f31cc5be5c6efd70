"""Floors, coverage and memorisation beside the domain yardstick (sfumato.evaluate.memorisation),
on the repository's real CIFAR-10 photos: a model that hands back training images is flagged as
copying and noise is not, the real floor sits between a perfect sample and noise, and a model
that draws one image per class covers less of the data than a real sample does."""

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato.config import DomainConfig
from sfumato.evaluate.domain import score, yardstick_from_arrays
from sfumato.evaluate.memorisation import MemorisationCheck, nearest

SETTINGS = DomainConfig(epochs=10, width=8, noise_images=32, batch_size=32, holdout_fraction=0.25)


@pytest.fixture(scope="module")
def photos(cifar_dir):
    paths = sorted(cifar_dir.glob("*/*.jpg"))
    classes = sorted({p.parent.name for p in paths})
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return images, np.array([classes.index(p.parent.name) for p in paths]), classes


@pytest.fixture(scope="module")
def yardstick(photos):
    return yardstick_from_arrays(*photos, SETTINGS)


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_training_images_handed_back_are_copies_and_noise_is_not(yardstick):
    real = yardstick.real
    labels = np.zeros(16, np.int64)
    copied = score(yardstick, pixels(real.train[:16]), labels)["memorisation"]
    assert copied["closer_than_real"] == 1.0 and copied["copies"] == 1.0
    assert copied["median_distance"] == pytest.approx(0, abs=1e-6)
    assert all(p["pixel_rmse"] == 0 for p in copied["closest_pairs"])
    # A copy shifted by one pixel is no longer identical, yet still far closer than real images are.
    shifted = score(yardstick, pixels(np.roll(real.train[:16], 1, axis=2)), labels)["memorisation"]
    assert shifted["copies"] >= 0.75
    noise = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    drawn = score(yardstick, noise, labels)["memorisation"]
    assert drawn["closer_than_real"] == 0 and drawn["copies"] == 0
    assert drawn["median_distance"] > drawn["heldout_median_distance"]


def test_the_real_floor_sits_between_the_reference_itself_and_noise(yardstick):
    real = yardstick.real
    itself = score(yardstick, pixels(real.heldout), np.zeros(len(real.heldout), np.int64))
    assert itself["fd_domain"] == pytest.approx(0, abs=1e-6), "the reference against itself"
    # Real training images of the sample's size: the floor no model can beat at that count.
    assert 0 < itself["fd_domain_floor"] < itself["noise_fd_domain"] / 2
    assert itself["floor_count"] == len(real.heldout)


def test_one_image_per_class_covers_less_than_a_real_sample(yardstick, photos):
    real = yardstick.real
    few = np.repeat(real.train[:2], 12, axis=0)  # 24 samples, 2 distinct images
    varied = real.train[np.random.default_rng(0).permutation(len(real.train))[:24]]
    labels = np.zeros(24, np.int64)
    narrow = score(yardstick, pixels(few), labels)
    broad = score(yardstick, pixels(varied), labels)
    assert narrow["coverage"] < broad["coverage"] and narrow["coverage"] < narrow["coverage_real"]
    assert 0.2 <= narrow["coverage_real"] <= 0.8, "two real samples of one size: about even"


def test_nearest_finds_each_rows_neighbours_in_order():
    bank = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    distances, indices = nearest(np.array([[0.9, 0.0], [3.0, 3.0]]), bank, k=2)
    assert indices.tolist() == [[2, 0], [1, 2]]
    assert distances[0] == pytest.approx([0.1, 0.9]) and distances[1][0] == pytest.approx(1.0)


def test_the_closest_pairs_are_kept_across_batches_and_drawn_side_by_side(yardstick):
    real = yardstick.real
    check = MemorisationCheck(real, shown=3)
    noise = (np.random.default_rng(1).random((6, 32, 32, 3)) * 255).astype(np.uint8)
    for batch in (noise[:3], real.train[5:7], noise[3:]):  # the two copies arrive in the middle
        check.add(batch, yardstick.classifier.features(pixels(batch)))
    result = check.result()
    assert [p["train_index"] for p in result["closest_pairs"][:2]] == [5, 6]
    assert result["closest_pairs"][2]["pixel_rmse"] > 0.05
    image = check.pairs_image(scale=1)
    assert image.size == (32 + 2 + 32, 3 * 32 + 2 * 2)

"""Fixtures every tier uses: real data from ../shared/datasets. Helpers to import: helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import DATASETS, extract


@pytest.fixture(scope="session")
def flowers_dir(tmp_path_factory) -> Path:
    """12 real flower photos of each of the 5 classes: val/<class>/*.jpg."""
    return extract(DATASETS / "flowers-val.tar", tmp_path_factory.mktemp("flowers"), 12) / "val"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """8 real CIFAR-10 JPEGs (32x32) of each of the 10 classes: train/<class>/*.jpg."""
    return extract(DATASETS / "cifar10-train.tar.gz", tmp_path_factory.mktemp("cifar"), 8) / "train"



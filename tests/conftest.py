"""Fixtures every tier uses: real images kept in the repository (tests/fixtures), so that a clone
with nothing beside it runs every test. Helpers to import: helpers.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers import FIXTURES, fixture_images


@pytest.fixture(scope="session")
def flowers_dir() -> Path:
    """12 real flower photos of each of the 5 classes (Flickr, CC-BY 2.0): <class>/*.jpg, in the
    repository. Read only: copy it to tmp_path to change anything."""
    return fixture_images("flowers", classes=5, per_class=12)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """8 real CIFAR-10 JPEGs (32x32) of each of the 10 classes: <class>/*.jpg, in the repository.
    Read only: copy it to tmp_path to change anything."""
    return fixture_images("cifar10", classes=10, per_class=8)


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def fixtures_stay_untouched():
    """Tests read the fixture images in place; one that wrote there would change every later run."""
    before = _fingerprint(FIXTURES)
    yield
    after = _fingerprint(FIXTURES)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"tests changed files under {FIXTURES} (copy to tmp_path first): {changed[:10]}"

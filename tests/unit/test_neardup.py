"""Near-duplicate search and clustering, on embeddings whose structure the test knows.

Tiny random CLIP encoders are not semantic (distinct flower photos reach cosine 0.998 under
one), so the search is tested here on (1) planted synthetic pairs, chains and near-misses, exact
and IVF, and (2) real flower photos and near-duplicates made from them (JPEG re-encode, 0.7x
rescale, 3% crop, mirror) under a descriptor that is known to be robust to those edits: a
centred square-root colour histogram. The full stage with a CLIP model runs in
tests/smoke/test_curate.py."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("faiss")

from sfumato.data.neardup import SearchSettings, candidate_pairs, choose_keepers, clusters  # noqa: E402


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted(n=6000, d=64, seed=0):
    """Random unit rows; rows 1..3 copy row 0 with small noise (one cluster of 4, cosine ~0.98);
    a chain 10~11~12 where 10 and 12 are below threshold to each other; 20~21 a near-miss (~0.9)."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, d)))

    def near(v, s):
        return _unit(v[None] + rng.standard_normal((1, d)) * s / np.sqrt(d))[0]

    for k in (1, 2, 3):
        x[k] = near(x[0], 0.2)
    x[12] = _unit((x[10] + 0.43 * x[12])[None])[0]  # cosine ~0.92 to row 10: not a pair
    x[11] = _unit((x[10] + x[12])[None])[0]  # halfway, ~0.98 to both ends: the chain's link
    x[21] = near(x[20], 0.5)
    return x


@pytest.mark.parametrize(
    "settings",
    [SearchSettings(), SearchSettings(exact_max=0, nlist=64, nprobe=8, train_sample=6000)],
    ids=["exact", "ivf"],
)
def test_search_finds_planted_pairs_and_clusters_join_chains(settings):
    x = _planted()
    assert 0.95 <= x[10] @ x[11] and 0.95 <= x[11] @ x[12] and x[10] @ x[12] < 0.95
    assert x[20] @ x[21] < 0.95
    i, j, s, method = candidate_pairs(x.astype(np.float16), settings)
    found = set(zip(i.tolist(), j.tolist()))
    assert {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (10, 11), (11, 12)} <= found, method
    assert (20, 21) not in found
    assert all(a < b for a, b in found) and (s >= 0.95 - 1e-3).all()
    labels = clusters(len(x), i, j)
    assert len({labels[k] for k in (0, 1, 2, 3)}) == 1 and len({labels[k] for k in (10, 11, 12)}) == 1
    assert labels[0] != labels[10] and labels[20] != labels[21]
    assert ("exact" in method) == (settings.exact_max > 0)


def test_keeper_is_the_largest_then_preferred_licence_then_id():
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([100, 400, 400, 50, 50, 10])
    rank = np.array([0, 1, 0, 1, 0, 0])
    kept = choose_keepers(labels, pixels, rank, ["a", "c", "b", "x", "y", "z"])
    assert kept.tolist() == [False, False, True, False, True, True]


def _descriptor(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int64) // 32
    h = np.bincount((a[..., 0] * 64 + a[..., 1] * 8 + a[..., 2]).ravel(), minlength=512).astype(np.float64)
    return np.sqrt(h / h.sum())


def _reencoded(img, quality=60):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_near_duplicates_of_real_photos_are_found_and_distinct_photos_are_not_merged(flowers_dir):
    photos = [Image.open(p).convert("RGB") for p in sorted(flowers_dir.rglob("*.jpg"))]
    assert len(photos) >= 40
    edits = {
        "jpeg60": _reencoded,
        "rescale0.7": lambda im: im.resize((int(im.width * 0.7), int(im.height * 0.7))),
        "crop3%": lambda im: im.crop(
            (
                int(im.width * 0.03),
                int(im.height * 0.03),
                im.width - int(im.width * 0.03),
                im.height - int(im.height * 0.03),
            )
        ),
        "mirror": ImageOps.mirror,
    }
    copies = [
        (k * 4 + e, name, fn(photos[k * 4 + e]))
        for k in range(len(photos) // 4)
        for e, (name, fn) in enumerate(edits.items())
    ]  # every photo gets one edit, the edits take turns
    vectors = np.stack([_descriptor(p) for p in photos] + [_descriptor(c) for _, _, c in copies])
    vectors = _unit(vectors - vectors[: len(photos)].mean(0))
    i, j, _, _ = candidate_pairs(vectors, SearchSettings(threshold=0.95))
    labels = clusters(len(vectors), i, j)
    for n, (original, name, _) in enumerate(copies):
        assert labels[len(photos) + n] == labels[original], f"{name} copy of photo {original} not found"
    assert len(set(labels[: len(photos)].tolist())) == len(photos), "distinct photos were merged"

"""Near-duplicate search and clustering on L2-normalised embeddings (cosine = inner product).

`candidate_pairs` finds every pair above a cosine threshold with a FAISS range search, in query
chunks so memory is bounded by the results, not n²: exact (`IndexFlatIP`) up to `exact_max`
vectors, an inverted-file index (`IndexIVFFlat`, k-means trained on a sample) above it, whose
`nprobe` trades recall for time. `clusters` joins pairs transitively (union-find) and
`choose_keepers` picks one row per cluster by a stated rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SearchSettings:
    threshold: float = 0.95
    exact_max: int = 50_000
    """Up to this many vectors the search is exact (IndexFlatIP, n² work: times in BENCHMARKS.md);
    above it, IVF."""
    nlist: int | None = None
    """IVF cells; None: about 4 * sqrt(n), at most 65536."""
    nprobe: int = 16
    train_sample: int = 100_000
    """Vectors the IVF k-means is trained on (at least 39 per cell, as FAISS asks)."""
    chunk: int = 16_384
    """Queries per range search."""
    seed: int = 0


def candidate_pairs(
    emb: np.ndarray, settings: SearchSettings = SearchSettings()
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """All pairs (i < j) with cosine >= threshold, from L2-normalised rows (float16 or float32;
    float16 is what the embedding stage stores). Returns (i, j, score, method)."""
    import faiss

    n, d = emb.shape
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), "none"
    step = settings.chunk

    def rows(start: int) -> np.ndarray:  # float16 storage in, float32 chunks to FAISS
        return np.ascontiguousarray(emb[start : start + step], dtype=np.float32)

    if n <= settings.exact_max:
        index, method = faiss.IndexFlatIP(d), "exact (IndexFlatIP)"
    else:
        nlist = settings.nlist or int(min(65536, 4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        # fp16 codes: half the memory of IVFFlat (1 GB instead of 2 at 1M x 512); their score
        # error is measured by `sfumato bench dedup` (BENCHMARKS.md).
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        rng = np.random.default_rng(settings.seed)
        picks = np.sort(rng.choice(n, size=min(n, max(settings.train_sample, 39 * nlist)), replace=False))
        index.train(np.ascontiguousarray(emb[picks], dtype=np.float32))
        index.nprobe = settings.nprobe
        method = f"approximate (IndexIVFScalarQuantizer fp16, nlist {nlist}, nprobe {settings.nprobe})"
    for start in range(0, n, step):
        index.add(rows(start))
    # Range search keeps scores > radius; step just below the threshold so >= holds.
    radius = float(np.nextafter(np.float32(settings.threshold), np.float32(-1)))
    found_i, found_j, found_s = [], [], []
    for start in range(0, n, step):
        lims, scores, ids = index.range_search(rows(start), radius)
        query = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = ids > query  # each pair once, no self-matches
        found_i.append(query[keep])
        found_j.append(ids[keep])
        found_s.append(scores[keep])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s), method


def clusters(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over the pairs: a cluster label per row (the smallest row index in it)."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(x) for x in range(n)])


def choose_keepers(labels: np.ndarray, pixels: np.ndarray, license_rank: np.ndarray, ids: list[str]) -> np.ndarray:
    """A bool per row: kept. In each cluster of two or more, the keeper has the most pixels,
    then the most preferred licence (lowest rank), then the smallest id; singletons are kept."""
    order = sorted(range(len(labels)), key=lambda r: (labels[r], -int(pixels[r]), int(license_rank[r]), ids[r]))
    kept = np.zeros(len(labels), dtype=bool)
    seen = set()
    for r in order:
        if labels[r] not in seen:
            seen.add(labels[r])
            kept[r] = True
    return kept

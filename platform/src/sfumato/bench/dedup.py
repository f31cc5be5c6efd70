"""`sfumato bench dedup`: near-duplicate search at scale, and the embedding stage's throughput.

Search: `--vectors` (default 1,000,000) random unit 512-d vectors stored as float16, of which 1%
are planted near-duplicates of other rows (cosine ~0.98) and another 1% near-misses (cosine
~0.89, which must not be reported). Random 512-d directions never come near 0.95 to each other
(their cosines have a spread of 1/sqrt(512)), so the planted pairs are exactly the true pairs.
The approximate search (IVF) runs on all of them; the exact search (IndexFlatIP, n² work) runs on
a `--exact-vectors` subset with its own planted pairs, where the approximate search runs too,
for a like-for-like comparison. Wall time, peak memory (the process tree's PSS, sampled), recall
and precision of the planted pairs for each.

Embedding: the flower photos, repeated to `--images` byte-distinct files, go through
`sfumato embed` (Ray Data actor pool, `--workers` actors, Ray itself already started) with a tiny
random CLIP, against the same `ClipEmbedder` called in a plain loop in this process with every
CPU thread; both clocks include loading the model; images/s of each and the ratio.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from sfumato.bench import add_datasets_argument, add_out_argument, publish
from sfumato.bench.ingest import Monitor, machine, make_inputs
from sfumato.data.neardup import SearchSettings, candidate_pairs

DIM = 512


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """float16 [n, DIM] unit rows and the set of planted pairs (i < j), built in chunks so the
    float32 version of the whole array never exists."""
    rng = np.random.default_rng(seed)
    emb = np.empty((n, DIM), np.float16)
    for start in range(0, n, 65536):
        x = rng.standard_normal((min(65536, n - start), DIM), dtype=np.float32)
        emb[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = rng.permutation(n)[: 4 * (n // 100)]
    dup_src, dup_dst, miss_src, miss_dst = np.split(rows, 4)

    def perturb(src, dst, size):
        x = emb[src].astype(np.float32) + rng.standard_normal((len(src), DIM), dtype=np.float32) * size / np.sqrt(DIM)
        emb[dst] = x / np.linalg.norm(x, axis=1, keepdims=True)

    perturb(dup_src, dup_dst, 0.2)  # cosine ~ 1 / sqrt(1 + 0.04) = 0.98
    perturb(miss_src, miss_dst, 0.5)  # cosine ~ 0.89
    return emb, {(min(a, b), max(a, b)) for a, b in zip(dup_src.tolist(), dup_dst.tolist())}


def search(emb: np.ndarray, truth: set, settings: SearchSettings) -> dict:
    with Monitor() as mon:
        start = time.perf_counter()
        i, j, scores, method = candidate_pairs(emb, settings)
        seconds = time.perf_counter() - start
    found = set(zip(i.tolist(), j.tolist()))
    hits = len(found & truth)
    # What the index reports against the float32 inner product of the stored float16 rows.
    exact = np.einsum("nd,nd->n", emb[i].astype(np.float32), emb[j].astype(np.float32))
    score_error = float(np.abs(scores - exact).max()) if len(i) else 0.0
    return {
        "vectors": len(emb),
        "method": method,
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(mon.peak_bytes / 2**20),
        "pairs_found": len(found),
        "planted": len(truth),
        "recall": round(hits / max(1, len(truth)), 4),
        "precision": round(hits / max(1, len(found)), 4),
        "max_score_error": round(score_error, 6),
    }


def embedding_throughput(args, tmp: Path) -> dict:
    import torch

    from sfumato.config import Config
    from sfumato.data.decode import DecodeLimits
    from sfumato.data.embed import ClipEmbedder, run_embed
    from sfumato.data.ingest import run_ingest
    from sfumato.layout import DataFolder
    from sfumato.runtime import init_ray
    from sfumato.testing.tiny import save_tiny_clip

    with tarfile.open(Path(args.datasets) / "flowers-val.tar") as tar:
        tar.extractall(tmp / "flowers", filter="data")
    inputs = make_inputs(sorted((tmp / "flowers").rglob("*.jpg")), args.images, tmp / "inputs")
    save_tiny_clip(tmp / "clip")
    cfg = Config.model_validate(
        {
            "name": "bench-embed",
            "ray": {"num_cpus": args.workers},
            "data": {
                "output_dir": str(tmp / "data"),
                "sources": [{"kind": "folder", "name": "flowers", "path": str(inputs), "license": "CC-BY-2.0"}],
                "ingest": {"license_allowlist": ["CC-BY-2.0"], "min_side_px": 32},
                "curate": {"clip": {"model": str(tmp / "clip"), "batch_size": 32, "num_workers": args.workers}},
            },
        }
    )
    images = run_ingest(cfg).accepted
    init_ray(cfg.ray)
    start = time.perf_counter()
    run_embed(cfg)
    stage_s = time.perf_counter() - start
    import pyarrow.parquet as pq

    table = pq.read_table(DataFolder(cfg.data.output_dir).manifest, columns=["id", "filepath", "caption"]).to_pydict()
    torch.set_num_threads(args.workers)
    start = time.perf_counter()  # both sides' clocks include loading the model
    embedder = ClipEmbedder(str(tmp / "clip"), DecodeLimits.from_config(cfg.data.ingest))
    for k in range(0, images, 32):
        embedder({name: np.array(values[k : k + 32], dtype=object) for name, values in table.items()})
    plain_s = time.perf_counter() - start
    return {
        "images": images,
        "stage_images_per_s": round(images / stage_s, 1),
        "plain_loop_images_per_s": round(images / plain_s, 1),
        "ratio": round(plain_s / stage_s, 3),
        "model": "tiny random CLIPModel (vision: 1 layer, 32 wide, 32 px)",
    }


def add_arguments(parser) -> None:
    parser.add_argument("--vectors", type=int, default=1_000_000, help="synthetic embeddings, approximate search")
    parser.add_argument("--exact-vectors", type=int, default=50_000, help="the subset searched exactly too")
    parser.add_argument("--images", type=int, default=5000, help="real photos embedded by the embedding stage")
    parser.add_argument("--workers", type=int, default=2, help="the embedding stage's actors (and torch threads)")
    add_datasets_argument(parser, "flowers-val.tar")
    add_out_argument(parser)


def run(args) -> dict:
    result = {"machine": machine()}
    emb, truth = planted(args.exact_vectors, seed=1)
    result["subset_exact"] = search(emb, truth, SearchSettings(exact_max=len(emb)))
    result["subset_approximate"] = search(emb, truth, SearchSettings(exact_max=0))
    del emb
    emb, truth = planted(args.vectors, seed=0)
    result["approximate"] = search(emb, truth, SearchSettings(exact_max=0))
    del emb
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-dedup-") as tmp:
        result["embedding"] = embedding_throughput(args, Path(tmp))
    return publish(result, report(result), args.out)


def report(r: dict) -> str:
    lines = [
        f"machine: {r['machine']['cpu']}, {r['machine']['nproc']} CPUs, {r['machine']['memory_gb']} GiB",
        "",
        f"{'search':58} {'vectors':>9} {'s':>7} {'peak MB':>8} {'recall':>7} {'precision':>9} {'score err':>9}",
    ]
    for key in ("subset_exact", "subset_approximate", "approximate"):
        s = r[key]
        lines.append(
            f"{s['method']:58} {s['vectors']:>9} {s['seconds']:>7} {s['peak_memory_mb']:>8} "
            f"{s['recall']:>7} {s['precision']:>9} {s['max_score_error']:>9}"
        )
    e = r["embedding"]
    lines += [
        "",
        f"embedding {e['images']} flower JPEGs, {e['model']}:",
        f"  Ray Data stage {e['stage_images_per_s']} images/s, plain loop {e['plain_loop_images_per_s']} "
        f"images/s, ratio {e['ratio']}",
    ]
    return "\n".join(lines)

"""Shards: every manifest row lands in every resolution's shards exactly once; a re-run skips
finished shards; a killed run (missing marker, half-written temp file) resumes without
duplicates or losses; data-parallel readers see disjoint, complete slices."""

import csv
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from helpers import debug_config
from sfumato.data.ingest import run_ingest
from sfumato.data.loader import iter_batches, shard_paths
from sfumato.data.shards import run_shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, flowers_dir, cifar_dir, ray_local):
    tmp = tmp_path_factory.mktemp("shards")
    sources = [
        {"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"},
        {"kind": "folder", "name": "cifar", "path": str(cifar_dir), "license": "research-only"},
    ]
    cfg = debug_config(tmp, sources, "data.shards.samples_per_shard=32", "data.shards.resolutions_px=[16,32]")
    run_ingest(cfg)
    summary = run_shards(cfg)
    return cfg, summary


def _keys_and_ids(tar_path):
    ids = []
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        for name in names:
            if name.endswith(".json"):
                ids.append(json.loads(tar.extractfile(name).read())["id"])
    return names, ids


def test_each_resolution_holds_every_manifest_row_once(sharded):
    cfg, summary = sharded
    manifest = pq.read_table(cfg.data.output_dir / "manifest.parquet").to_pandas()
    shards_dir = cfg.data.output_dir / "shards"
    assert summary.samples == len(manifest) and summary.failed == 0
    with (shards_dir / "shard_manifest.csv").open() as fh:
        listed = list(csv.DictReader(fh))
    for res in (16, 32):
        rows = [r for r in listed if int(r["resolution_px"]) == res]
        assert sum(int(r["sample_count"]) for r in rows) == len(manifest)
        ids = []
        for r in rows:
            path = shards_dir / r["shard"]
            assert path.stat().st_size == int(r["bytes"])
            names, shard_ids = _keys_and_ids(path)
            assert len(shard_ids) == int(r["sample_count"])
            assert len([n for n in names if n.endswith(".png")]) == len(shard_ids)
            ids += shard_ids
        assert sorted(ids) == sorted(manifest["id"]), f"{res}px: every row exactly once"


def test_samples_carry_their_metadata_and_size(sharded):
    cfg, _ = sharded
    batch = next(iter_batches(shard_paths(cfg.data.output_dir / "shards", 32), 8, 32))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype.name == "uint8"
    classes = json.loads((cfg.data.output_dir / "shards" / "classes.json").read_text())
    assert len(classes) == 15  # 5 flower classes + 10 CIFAR classes
    assert all(0 <= c < len(classes) for c in batch["class"])
    assert all(c.startswith("a photo of a ") for c in batch["caption"])


def test_rerun_skips_complete_shards(sharded, ray_local):
    cfg, first = sharded
    again = run_shards(cfg)
    assert again.written == 0 and again.skipped == first.shards and again.samples == first.samples


def test_killed_run_resumes_without_duplicates_or_losses(sharded, ray_local):
    cfg, first = sharded
    res_dir = cfg.data.output_dir / "shards" / "32"
    victim = res_dir / "shard-000001.tar"
    before = victim.read_bytes()
    # What a kill leaves behind: no completion marker, and a half-written temp tar.
    victim.with_suffix(".json").unlink()
    (res_dir / ".shard-000002.tar.tmp-999-1").write_bytes(before[: len(before) // 2])  # a dead writer's
    resumed = run_shards(cfg)
    assert resumed.written == 1 and resumed.samples == first.samples
    assert victim.read_bytes() == before, "a re-written shard is byte-identical"
    assert not [p for p in res_dir.iterdir() if ".tmp" in p.name]


def test_changed_settings_rewrite_the_shards(sharded, ray_local):
    cfg, first = sharded
    changed = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"shards": cfg.data.shards.model_copy(update={"samples_per_shard": 50})})
        }
    )
    summary = run_shards(changed)
    assert summary.written == summary.shards and summary.samples == first.samples
    assert len(list((cfg.data.output_dir / "shards" / "16").glob("*.tar"))) == summary.shards


def test_ranks_read_disjoint_complete_slices(sharded):
    cfg, _ = sharded
    paths = shard_paths(cfg.data.output_dir / "shards", 16)
    seen = [
        [i for b in iter_batches(paths, 7, 16, rank=r, world_size=2, drop_last=False) for i in b["id"]]
        for r in range(2)
    ]
    assert not set(seen[0]) & set(seen[1])
    everything = [i for b in iter_batches(paths, 7, 16, drop_last=False) for i in b["id"]]
    assert sorted(seen[0] + seen[1]) == sorted(everything)
    assert seen[0] == [i for b in iter_batches(paths, 7, 16, rank=0, world_size=2, drop_last=False) for i in b["id"]]

"""Shards: the manifest's accepted rows -> WebDataset tars per resolution + shard_manifest.csv.

Samples are assigned to shards by their order in the manifest, so a shard's content is a pure
function of the manifest and the render settings; that function's hash is stored beside each
finished tar. A re-run skips shards whose tar and sidecar are complete with the same hash, and a
tar is only ever renamed into place once fully written, so a killed run resumes without
duplicating or losing samples and a half-written tar is never read as whole.

Per sample the tar holds `<key>.<png|jpg|webp>`, `<key>.txt` (caption), `<key>.json` (id,
caption, tags, licence, source, class, allow_hflip, size; `bucket_px` [width, height] with
data.shards.buckets) and, when the row has tags,
`<key>.cls` (class index from classes.json). Keys are the sample's position in the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray

from sfumato.config import Config, content_hash, write_resolved
from sfumato.data.decode import EXTENSIONS, DecodeLimits, Rejected, decode_image, encode, nearest_bucket, render
from sfumato.data.manifest import OK
from sfumato.layout import (
    DataFolder,
    ShardFolder,
    atomic_write,
    atomic_write_json,
    commit_file,
    is_temporary,
    temporary_sibling,
)
from sfumato.runtime import cpu_tasks, init_ray

log = logging.getLogger(__name__)

_COLUMNS = ["id", "filepath", "caption", "tags", "license", "source", "sha256", "width", "height"]


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata makes a re-written shard byte-identical.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Ray Data stage: one shard spec per row -> the shard's tars, one per resolution."""

    def __init__(self, shards_cfg, limits: DecodeLimits, shards_dir: str):
        self.cfg = shards_cfg
        self.limits = limits
        self.folder = ShardFolder(shards_dir)

    def _draft_px(self) -> int:
        """The smallest side a JPEG may be decoded at: the largest side any render asks for (a
        wide bucket's width is above its resolution), so nothing is scaled up."""
        sizes = [s for res in self.cfg.resolutions_px for s in (self.cfg.bucket_sizes(res) or [(res, res)])]
        return max(side for size in sizes for side in size)

    def __call__(self, spec: dict) -> dict:
        rows, index, spec_hash = json.loads(spec["rows_json"]), spec["index"], spec["spec_hash"]
        ext = EXTENSIONS[self.cfg.image_format]
        tmp = {res: temporary_sibling(self.folder.shard(res, index)) for res in self.cfg.resolutions_px}
        tars = {res: tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) for res, path in tmp.items()}
        counts = {res: 0 for res in tmp}
        sources = Counter()  # samples per source: which shards a source's mixture stream opens
        failed = []
        for row in rows:
            try:
                with open(row["filepath"], "rb") as fh:
                    data = fh.read()
                decoded = decode_image(data, self.limits, draft_px=self._draft_px())
            except (OSError, Rejected) as exc:
                # The file changed or vanished since ingest: recorded, never silently dropped.
                failed.append({"id": row["id"], "error": str(exc)})
                continue
            sources[row["source"]] += 1
            for res, tar in tars.items():
                meta = {k: row[k] for k in ("id", "caption", "tags", "license", "source", "class")}
                meta.update(
                    allow_hflip=self.cfg.allow_hflip,
                    resolution_px=res,
                    orig_width=decoded.width,
                    orig_height=decoded.height,
                )
                bucket = None
                if self.cfg.buckets is not None:
                    # By the decoded image's shape (EXIF-oriented), not the manifest's stored size.
                    bucket = nearest_bucket(*decoded.image.size, self.cfg.bucket_sizes(res))
                    meta["bucket_px"] = list(bucket)
                key = row["key"]
                tar_add(
                    tar,
                    f"{key}.{ext}",
                    encode(
                        render(decoded.image, res, self.cfg.resize_mode, bucket),
                        self.cfg.image_format,
                        self.cfg.jpeg_quality,
                    ),
                )
                tar_add(tar, f"{key}.txt", (row["caption"] or "").encode())
                tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                if row["class"] is not None:
                    tar_add(tar, f"{key}.cls", str(row["class"]).encode())
                counts[res] += 1
        for res, tar in tars.items():
            tar.close()
            final = commit_file(tmp[res], self.folder.shard(res, index))
            digest = hashlib.sha256(final.read_bytes()).hexdigest()
            sidecar = {
                "shard": self.folder.relative(final),
                "resolution_px": res,
                "sample_count": counts[res],
                "bytes": final.stat().st_size,
                "sha256": digest,
                "spec_hash": spec_hash,
                "failed": failed,
                "sources": dict(sorted(sources.items())),
            }
            atomic_write_json(self.folder.sidecar(final), sidecar, indent=None)  # the completion marker, last
        return {"index": index, "failed": len(failed)}


def _complete(shards_dir: Path, res: int, index: int, spec_hash: str) -> dict | None:
    tar = ShardFolder(shards_dir).shard(res, index)
    side = ShardFolder.sidecar(tar)
    if not (tar.exists() and side.exists()):
        return None
    info = json.loads(side.read_text())
    return info if info["spec_hash"] == spec_hash and info["bytes"] == tar.stat().st_size else None


@dataclass(frozen=True)
class ShardSummary:
    shards: int
    written: int
    skipped: int
    samples: int
    failed: int
    shards_dir: str

    def line(self) -> str:
        return (
            f"shards: {self.samples} samples in {self.shards} shards per resolution "
            f"({self.written} written, {self.skipped} already complete, {self.failed} failed) -> {self.shards_dir}"
        )


def run_shards(cfg: Config) -> ShardSummary:
    data, scfg = DataFolder(cfg.data.output_dir), cfg.data.shards
    if not data.manifest.exists():
        raise FileNotFoundError(f"{data.manifest} does not exist: run `sfumato ingest` first")
    table = pq.read_table(data.manifest, columns=_COLUMNS + ["status"])
    rows = [r for r in table.to_pylist() if r["status"] == OK]
    shards_dir, folder = data.shards, data.shard_folder
    for res in scfg.resolutions_px:
        folder.resolution(res).mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, folder.config)
    # The class of a sample is its innermost tag (a folder source's class folder).
    classes = {tag: i for i, tag in enumerate(sorted({r["tags"][-1] for r in rows if r["tags"]}))}
    atomic_write_json(folder.classes, classes)
    counts = Counter(r["tags"][-1] for r in rows if r["tags"])
    atomic_write_json(folder.class_counts, {t: counts[t] for t in classes})
    # What `train.class_balanced` samples with: the rarest class always, the others rarest/count.
    atomic_write_json(folder.class_weights, balancing_weights({t: counts[t] for t in classes}))
    for key, row in enumerate(rows):
        row["key"] = f"{key:09d}"
        row["class"] = classes[row["tags"][-1]] if row["tags"] else None
    render_params = {
        **scfg.model_dump(mode="json", exclude={"num_workers"}),
        "limits": DecodeLimits.from_config(cfg.data.ingest).__dict__,
    }
    specs = []
    per = scfg.samples_per_shard
    for index, start in enumerate(range(0, len(rows), per)):
        chunk = rows[start : start + per]
        spec_hash = content_hash(
            render_params, [(r["key"], r["id"], r["sha256"], r["caption"], r["class"]) for r in chunk]
        )
        specs.append({"index": index, "spec_hash": spec_hash, "rows": chunk})
    pending = [
        s
        for s in specs
        if any(_complete(shards_dir, res, s["index"], s["spec_hash"]) is None for res in scfg.resolutions_px)
    ]
    _remove_stale(shards_dir, scfg.resolutions_px, len(specs))
    if pending:
        init_ray(cfg.ray)
        limits = DecodeLimits.from_config(cfg.data.ingest)
        # One row per shard; its sample list travels as JSON (plain Arrow, no nested inference).
        items = [
            {"index": s["index"], "spec_hash": s["spec_hash"], "rows_json": json.dumps(s["rows"])} for s in pending
        ]
        # Tasks, not an actor pool: the writer holds no state worth keeping, and Ray's
        # already-started workers run tasks without the seconds an actor pool spends starting up.
        done = ray.data.from_items(items, override_num_blocks=len(items)).map(
            ShardWriter(scfg, limits, str(shards_dir)),
            num_cpus=1,
            compute=cpu_tasks(scfg.num_workers),
        )
        done.context.op_resource_reservation_enabled = False  # one operator: see ingest
        for _ in done.iter_rows():
            pass
    sidecars = [_complete(shards_dir, res, s["index"], s["spec_hash"]) for res in scfg.resolutions_px for s in specs]
    if any(info is None for info in sidecars):
        raise RuntimeError(f"some shards in {shards_dir} did not complete; re-run `sfumato shards` to resume")
    _write_shard_manifest(shards_dir, sidecars)
    failed = sum(len(i["failed"]) for i in sidecars[: len(specs)])
    summary = ShardSummary(
        len(specs),
        len(pending),
        len(specs) - len(pending),
        sum(i["sample_count"] for i in sidecars[: len(specs)]),
        failed,
        str(shards_dir),
    )
    log.info(summary.line())
    return summary


def balancing_weights(class_counts: dict[str, int]) -> dict[str, float]:
    """Acceptance probability per class (tag): rarest class 1, others rarest/count, so every
    class is drawn equally often in expectation (frequent classes are subsampled)."""
    present = {tag: n for tag, n in class_counts.items() if n > 0}
    rarest = min(present.values(), default=1)
    return {tag: rarest / n for tag, n in present.items()}


def _remove_stale(shards_dir: Path, resolutions: list[int], count: int) -> None:
    """Shards past the current count (left by a run over a larger manifest) and temp files of a
    killed run are removed, so the folder holds exactly the current set."""
    for res in resolutions:
        for path in ShardFolder(shards_dir).resolution(res).iterdir():
            stem = path.name.split(".")[0]
            stale_index = stem.startswith("shard-") and stem[6:].isdigit() and int(stem[6:]) >= count
            if is_temporary(path) or stale_index:
                path.unlink()


def _write_shard_manifest(shards_dir: Path, sidecars: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["shard", "resolution_px", "sample_count", "bytes", "sha256"])
    writer.writeheader()
    for info in sidecars:
        writer.writerow({k: info[k] for k in writer.fieldnames})
    atomic_write(ShardFolder(shards_dir).manifest, text.getvalue())

"""Ingest: sources -> manifest.parquet + rejects.parquet, with a reason for every reject.

Pass 1 (Ray Data, streaming): input records flow through Ray tasks (an `IngestWorker` per process) that
read the bytes (file, tar member or URL), hash them, apply the licence policy and decode them
safely. Only metadata comes back to the driver; bytes fetched from URLs or tars are kept,
content-addressed, under blobs/ so later stages read every image from a local `filepath`.
Pass 2 (driver, metadata only): duplicate ids are rejected and exact duplicates (same sha256)
are collapsed onto the first copy in source order, recorded with `duplicate_of`.
Every input record ends in exactly one of the two files; the stage checks that before writing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from sfumato.config import Config, write_resolved
from sfumato.data.decode import DecodeLimits, Rejected, decode_image
from sfumato.data.download import Downloader
from sfumato.data.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, write_table
from sfumato.data.sources import enumerate_sources
from sfumato.layout import DataFolder, atomic_write, atomic_write_json
from sfumato.runtime import cluster_cpus, cpu_tasks, init_ray

log = logging.getLogger(__name__)

MISSING_LICENSE = "missing_license"
LICENSE_NOT_ALLOWED = "license_not_allowed"
READ_ERROR = "read_error"
DUPLICATE_ID = "duplicate_id"
EXACT_DUPLICATE = "exact_duplicate"

_TEXT = pa.string()
INPUT_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("source", _TEXT),
        ("locator", _TEXT),
        ("uri", _TEXT),
        ("kind", _TEXT),
        ("id", _TEXT),
        ("caption", _TEXT),
        ("license", _TEXT),
        ("origin", _TEXT),
        ("tags", pa.list_(_TEXT)),
        ("tar_offset", pa.int64()),
        ("tar_size", pa.int64()),
        ("precheck", _TEXT),
        ("precheck_detail", _TEXT),
    ]
)
RESULT_SCHEMA = pa.schema(
    [f for f in INPUT_SCHEMA if f.name not in ("tar_offset", "tar_size", "precheck", "precheck_detail")]
    + [
        ("status", _TEXT),
        ("reason", _TEXT),
        ("detail", _TEXT),
        ("sha256", _TEXT),
        ("filepath", _TEXT),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", _TEXT),
        ("source_mode", _TEXT),
        ("bytes", pa.int64()),
    ]
)


def derived_id(source: str, locator: str) -> str:
    """A stable id for inputs that do not declare one: the same file gets the same id on
    every run."""
    return hashlib.sha1(f"{source}\0{locator}".encode()).hexdigest()[:20]


class IngestWorker:
    """Ray Data stage: input records -> result rows (status ok or rejected, with a reason)."""

    def __init__(self, ingest_cfg, blobs_dir: str):
        self.limits = DecodeLimits.from_config(ingest_cfg)
        self.allowed = {lic.casefold(): lic for lic in ingest_cfg.license_allowlist}
        self.blobs_dir = Path(blobs_dir)
        self.downloader = Downloader(ingest_cfg.download)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # Licence first: a row we may not use is never downloaded.
        for row in rows:
            if row["id"] is None:
                row["id"] = derived_id(row["source"], row["locator"])
            if row["precheck"] is None:
                self._check_license(row)
        urls = [i for i, r in enumerate(rows) if r["kind"] == "url" and r["precheck"] is None]
        fetched = dict(zip(urls, self.downloader.fetch_many([rows[i]["uri"] for i in urls])))
        return pa.Table.from_pylist(
            [self._process(i, row, fetched) for i, row in enumerate(rows)], schema=RESULT_SCHEMA
        )

    def _check_license(self, row: dict) -> None:
        lic = row["license"]
        if lic is None:
            row["precheck"], row["precheck_detail"] = (
                MISSING_LICENSE,
                "no licence on the row and no default for the source",
            )
        elif lic.casefold() not in self.allowed:
            row["precheck"], row["precheck_detail"] = LICENSE_NOT_ALLOWED, f"{lic!r} not in license_allowlist"
        else:
            row["license"] = self.allowed[lic.casefold()]

    def _process(self, index: int, row: dict, fetched: dict) -> dict:
        out = {k: row[k] for k in RESULT_SCHEMA.names if k in row}
        if row["precheck"] is not None:
            return {**out, "status": "rejected", "reason": row["precheck"], "detail": row["precheck_detail"]}
        try:
            data = self._read(row, fetched.get(index))
            sha = hashlib.sha256(data).hexdigest()
            out["sha256"], out["bytes"] = sha, len(data)
            # Validation only: full decode (truncation shows), no colour conversion.
            decoded = decode_image(data, self.limits, draft_px=self.limits.min_side_px, convert=False)
        except Rejected as rej:
            return {**out, "status": "rejected", "reason": rej.reason, "detail": rej.detail}
        filepath = row["uri"] if row["kind"] == "file" else self._store_blob(sha, decoded.format, data)
        return {
            **out,
            "status": "ok",
            "filepath": filepath,
            "width": decoded.width,
            "height": decoded.height,
            "format": decoded.format,
            "source_mode": decoded.source_mode,
        }

    def _read(self, row: dict, fetched) -> bytes:
        if row["kind"] == "url":
            if fetched.data is None:
                raise Rejected(fetched.reason, fetched.detail)
            return fetched.data
        cap = self.limits.max_file_bytes
        try:
            if row["kind"] == "tar":
                if row["tar_size"] > cap:
                    raise Rejected("file_too_large", f"{row['tar_size']} bytes > max_file_bytes={cap}")
                with open(row["uri"].rsplit("#", 1)[0], "rb") as fh:
                    fh.seek(row["tar_offset"])
                    data = fh.read(row["tar_size"])
                if len(data) != row["tar_size"]:
                    raise Rejected("truncated", f"tar member has {len(data)} of {row['tar_size']} bytes")
                return data
            size = os.stat(row["uri"]).st_size
            if size > cap:
                raise Rejected("file_too_large", f"{size} bytes > max_file_bytes={cap}")
            with open(row["uri"], "rb") as fh:
                # read(size + 1), not read(cap): Python allocates the whole requested length up
                # front, and a 64 MiB buffer per file made ingest system-call bound.
                data = fh.read(size + 1)
            if len(data) > cap:
                raise Rejected("file_too_large", f"grew to over max_file_bytes={cap} while read")
            return data
        except OSError as exc:
            raise Rejected(READ_ERROR, f"{type(exc).__name__}: {exc.strerror or exc}") from None

    def _store_blob(self, sha: str, fmt: str, data: bytes) -> str:
        """Content-addressed copy of bytes that have no local file of their own."""
        path = self.blobs_dir / sha[:2] / f"{sha}.{fmt.lower()}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return str(path)


_WORKERS: dict[tuple[str, str], IngestWorker] = {}


def ingest_batch(batch: pa.Table, ingest_cfg, blobs_dir: str) -> pa.Table:
    """The Ray Data task: one IngestWorker per process and config, so a task process keeps its
    downloader (session, per-host rate limit) from batch to batch, as an actor would."""
    key = (ingest_cfg.model_dump_json(), blobs_dir)
    if key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[key] = IngestWorker(ingest_cfg, blobs_dir)
    return _WORKERS[key](batch)


def split_duplicates(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Order rows by source and locator, then reject repeated ids and collapse exact duplicates
    (same sha256) onto their first copy. Returns (accepted, rejected); every row is in one."""
    results = results.sort_values(["source_index", "locator"], kind="stable").reset_index(drop=True)
    results["duplicate_of"] = None
    ok = results["status"] == "ok"
    repeated = ok & results["id"].where(ok).duplicated(keep="first")
    first_uri = results[ok].drop_duplicates("id").set_index("id")["uri"]
    results.loc[repeated, ["status", "reason"]] = ["rejected", DUPLICATE_ID]
    results.loc[repeated, "detail"] = results.loc[repeated, "id"].map(
        lambda i: f"id {i!r} already used by {first_uri[i]}"
    )

    ok = results["status"] == "ok"
    copies = ok & results["sha256"].where(ok).duplicated(keep="first")
    keeper = results[ok].drop_duplicates("sha256").set_index("sha256")["id"]
    results.loc[copies, ["status", "reason"]] = ["rejected", EXACT_DUPLICATE]
    results.loc[copies, "duplicate_of"] = results.loc[copies, "sha256"].map(keeper)
    results.loc[copies, "detail"] = "same sha256 as id " + results.loc[copies, "duplicate_of"].astype(str)
    accepted = results[results["status"] == "ok"]
    return accepted, results[results["status"] != "ok"]


@dataclass(frozen=True)
class IngestSummary:
    inputs: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    output_dir: str

    def line(self) -> str:
        top = ", ".join(f"{k}={v}" for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return (
            f"ingest: {self.inputs} inputs -> {self.accepted} in manifest, {self.rejected} rejected ({top or 'none'})"
        )


def _keep_collection_dates(df: pd.DataFrame, previous: Path, keys: list[str], now: pd.Timestamp) -> pd.DataFrame:
    """date_collected: when a row was first collected. A row that an earlier ingest of this
    folder already wrote (the same `keys`) keeps its date, so re-ingesting the same inputs writes
    the same files, and the pipeline's later stages see unchanged inputs and stay skipped."""
    dates = pd.Series(now, index=df.index, dtype="datetime64[us, UTC]")
    if previous.is_file() and len(df):
        old = pq.read_table(previous, columns=[*keys, "date_collected"]).to_pandas()
        old = old.drop_duplicates(keys).set_index(keys)["date_collected"]
        found = pd.MultiIndex.from_frame(df[keys].astype(object)).map(lambda key: old.get(key, pd.NaT))
        dates = pd.Series(found, index=df.index).fillna(now).astype("datetime64[us, UTC]")
    return df.assign(date_collected=dates)


def run_ingest(cfg: Config) -> IngestSummary:
    folder = DataFolder(cfg.data.output_dir)
    out = folder.root
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, folder.ingest_config)
    records = list(enumerate_sources(cfg.data.sources, folder.demo))
    if not records:
        raise ValueError(f"the sources {[s.name for s in cfg.data.sources]} hold no files at all")
    init_ray(cfg.ray)
    cap = cfg.data.ingest.num_workers
    workers = cap or cluster_cpus()
    # Enough blocks to keep every worker busy; a block is a few dozen input records (metadata).
    rows_per_block = max(1, min(4 * cfg.data.ingest.batch_size, math.ceil(len(records) / (4 * workers))))
    blocks = [
        pa.Table.from_pylist(records[i : i + rows_per_block], schema=INPUT_SCHEMA)
        for i in range(0, len(records), rows_per_block)
    ]
    # Tasks on Ray's already-started workers, not an actor pool: no actor start-up, and no pool
    # holding every CPU while an upstream operator waits for one (BENCHMARKS.md, ingest).
    dataset = ray.data.from_arrow(blocks).map_batches(
        ingest_batch,
        fn_kwargs={"ingest_cfg": cfg.data.ingest, "blobs_dir": str(folder.blobs)},
        batch_size=cfg.data.ingest.batch_size,
        batch_format="pyarrow",
        compute=cpu_tasks(cap),
        num_cpus=1,
    )
    # One operator fed from memory: there is no downstream operator to reserve CPUs for, and
    # the reservation held every task but one back for the first seconds (a task trace:
    # BENCHMARKS.md, ingest).
    dataset.context.op_resource_reservation_enabled = False
    parts = [batch for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow")]
    results = pa.concat_tables(parts).to_pandas() if parts else RESULT_SCHEMA.empty_table().to_pandas()
    accepted, rejected = split_duplicates(results)
    if len(accepted) + len(rejected) != len(records):
        raise RuntimeError(
            f"ingest lost rows: {len(records)} inputs, {len(accepted)} accepted + {len(rejected)} rejected"
        )
    now = pd.Timestamp(datetime.now(timezone.utc))
    accepted = _keep_collection_dates(accepted.assign(nsfw_flag=None), folder.manifest, ["id", "sha256"], now)
    rejected = _keep_collection_dates(rejected, folder.rejects, ["source", "locator", "reason"], now)
    write_table(accepted, MANIFEST_SCHEMA, folder.manifest)  # nsfw_flag: set by curation
    write_table(rejected, REJECTS_SCHEMA, folder.rejects)
    summary = IngestSummary(
        len(records), len(accepted), len(rejected), rejected["reason"].value_counts().to_dict(), str(out)
    )
    atomic_write_json(folder.ingest_summary, summary.__dict__, indent=2)
    log.info(summary.line())
    return summary

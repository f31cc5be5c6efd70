"""The manifest's and the rejects' schemas, the statuses a manifest row can have, and the one
writer of both files (atomic, through sfumato.layout).

Every input row ends in exactly one of the two files: manifest.parquet (accepted, with a status)
or rejects.parquet (with a reason). The curation stages add columns (CURATION_FIELDS) and set the
status of the rows they take out of training; only `ok` rows reach the shards.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sfumato.layout import commit_file, temporary_sibling

_TEXT = pa.string()

# A manifest row's status: only `ok` rows reach the shards; the curation stages set the others
# (and reset their own on a re-run). Every row ingest accepted keeps one of these.
OK, NEAR_DUPLICATE, UNSAFE, LOW_AESTHETIC = "ok", "near_duplicate", "unsafe", "low_aesthetic"
ACCEPTED_STATUSES = (OK, NEAR_DUPLICATE, UNSAFE, LOW_AESTHETIC)

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", _TEXT),
        ("filepath", _TEXT),
        ("caption", _TEXT),
        ("license", _TEXT),
        ("source", _TEXT),
        ("origin", _TEXT),
        ("uri", _TEXT),
        ("sha256", _TEXT),
        ("nsfw_flag", pa.bool_()),
        ("tags", pa.list_(_TEXT)),
        ("date_collected", pa.timestamp("us", tz="UTC")),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", _TEXT),
        ("source_mode", _TEXT),
        ("bytes", pa.int64()),
        ("status", _TEXT),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source", _TEXT),
        ("uri", _TEXT),
        ("locator", _TEXT),
        ("id", _TEXT),
        ("caption", _TEXT),
        ("license", _TEXT),
        ("origin", _TEXT),
        ("tags", pa.list_(_TEXT)),
        ("reason", _TEXT),
        ("detail", _TEXT),
        ("duplicate_of", _TEXT),
        ("sha256", _TEXT),
        ("date_collected", pa.timestamp("us", tz="UTC")),
    ]
)

# Columns later stages add to the manifest (curation), with their types.
CURATION_FIELDS = [
    pa.field("near_dup_cluster", pa.int64()),
    pa.field("near_dup_of", _TEXT),
    pa.field("caption_source", _TEXT),
    pa.field("caption_origin", _TEXT),
    pa.field("nsfw_score", pa.float64()),
    pa.field("aesthetic_score", pa.float64()),
]


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """The manifest's columns plus whichever curation columns `df` has, written atomically."""
    schema = MANIFEST_SCHEMA
    for field in CURATION_FIELDS:
        if field.name in df:
            schema = schema.append(field)
    write_table(df, schema, path)


def write_table(df: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    """`df`'s columns of `schema` as parquet, replacing `path` whole."""
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    tmp = temporary_sibling(path)
    pq.write_table(table, tmp)
    commit_file(tmp, path)


def read_manifest(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()

"""Enumerate the configured sources into input records, one per input the user gave us.

A record says where the bytes are (a local path, a URL, or a member of a tar), what the source
declared about it (id, caption, licence, provenance), and, when enumeration itself already found
a problem (a path that escapes its root, a row without a path, an unreadable tar), a precheck
reason. Every record reaches the ingest stage, so every input ends in the manifest or in the
rejects: enumeration never drops anything silently. Only paths and metadata are held here; the
bytes are read by the ingest workers.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sfumato.config import DemoSource, FolderSource, TableSource, WebDatasetSource
from sfumato.data import demo

# Precheck reject reasons.
PATH_ESCAPES_ROOT = "path_escapes_root"
MISSING_PATH = "missing_path"
UNSUPPORTED_SCHEME = "unsupported_scheme"
UNREADABLE_TAR = "unreadable_tar"
NO_IMAGE_IN_SAMPLE = "no_image_in_sample"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def record(source_index: int, source: str, locator: str, uri: str, **fields) -> dict:
    """The input record; `locator` orders records within a source (it is the tie-break for
    which copy of an exact duplicate is kept)."""
    base = {
        "source_index": source_index,
        "source": source,
        "locator": locator,
        "uri": uri,
        "kind": "file",  # file | url | tar
        "id": None,
        "caption": None,
        "license": None,
        "origin": None,
        "tags": [],
        "tar_offset": None,
        "tar_size": None,
        "precheck": None,
        "precheck_detail": None,
    }
    base.update(fields)
    return base


def inside(root: Path, path: Path) -> bool:
    """True if `path` (symlinks resolved) stays under `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _tag(name: str) -> str:
    return name.replace("_", " ").strip()


def enumerate_folder(index: int, src: FolderSource) -> Iterator[dict]:
    """Files under the folder in sorted order. The walk does not follow directory links, so every
    folder it enters is a real one under the root: only a file that is itself a link can point
    outside, and only links pay for resolving their path."""
    root = src.path
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        tags = [_tag(part) for part in parts]  # the same for every file of the folder
        caption = src.caption_template.format(tag=tags[-1]) if src.caption_template and tags else None
        prefix = "" if not parts else "/".join(parts) + "/"
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            rel = prefix + filename
            fields = {"tags": list(tags), "caption": caption, "license": src.license}
            if os.path.islink(path) and not inside(real_root, path):
                fields.update(precheck=PATH_ESCAPES_ROOT, precheck_detail=f"{rel} -> {os.path.realpath(path)}")
            yield record(index, src.name, rel, path, **fields)


def _read_table(path: Path, text_columns: list[str]):
    if path.suffix.lower() == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=8192)
    else:
        # Read as text, not inferred: an id "007" must stay "007".
        opts = pacsv.ConvertOptions(strings_can_be_null=True, column_types={name: pa.string() for name in text_columns})
        reader = pacsv.open_csv(path, convert_options=opts, read_options=pacsv.ReadOptions(block_size=1 << 22))
        yield from reader


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _tags(value) -> list[str]:
    """Tags as a list (parquet) or one '|'-separated string (CSV)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split("|")
    return [t for t in (_text(v) for v in items) if t]


def enumerate_table(index: int, src: TableSource) -> Iterator[dict]:
    root = src.root or src.path.parent
    wanted = [
        c
        for c in (
            src.path_column,
            src.id_column,
            src.caption_column,
            src.license_column,
            src.source_column,
            src.tags_column,
        )
        if c
    ]
    row_number = 0
    for batch in _read_table(src.path, wanted):
        if src.path_column not in batch.schema.names:
            raise ValueError(
                f"table {src.path} has no column {src.path_column!r} "
                f"(data.sources[{src.name}].path_column); columns: {batch.schema.names}"
            )
        columns = {name: batch.column(name).to_pylist() for name in wanted if name in batch.schema.names}
        for i in range(batch.num_rows):
            get = lambda name, i=i, columns=columns: _text(columns[name][i]) if name in columns else None  # noqa: E731
            value = get(src.path_column)
            fields = {
                "id": get(src.id_column),
                "caption": get(src.caption_column),
                "license": get(src.license_column) or src.license,
                "origin": get(src.source_column),
                "tags": _tags(columns[src.tags_column][i]) if src.tags_column in columns else [],
            }
            locator = f"row{row_number:012d}"
            row_number += 1
            if value is None:
                yield record(
                    index,
                    src.name,
                    locator,
                    f"{src.path}#{locator}",
                    precheck=MISSING_PATH,
                    precheck_detail=f"row {row_number - 1} has no {src.path_column!r}",
                    **fields,
                )
                continue
            scheme = urlparse(value).scheme.lower()
            if scheme in ("http", "https"):
                yield record(index, src.name, locator, value, kind="url", **fields)
            elif scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
                yield record(
                    index,
                    src.name,
                    locator,
                    value,
                    precheck=UNSUPPORTED_SCHEME,
                    precheck_detail=f"{scheme}:// is not supported (http, https or a local path)",
                    **fields,
                )
            else:
                path = Path(value) if os.path.isabs(value) else root / value
                if not inside(root, path):
                    yield record(
                        index,
                        src.name,
                        locator,
                        value,
                        precheck=PATH_ESCAPES_ROOT,
                        precheck_detail=f"{value} resolves outside {root}",
                        **fields,
                    )
                else:
                    yield record(index, src.name, locator, str(path), **fields)


def _tar_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*.tar") if p.is_file())


def enumerate_webdataset(index: int, src: WebDatasetSource) -> Iterator[dict]:
    for tar_path in _tar_files(src.path):
        rel = tar_path.name if src.path.is_file() else tar_path.relative_to(src.path).as_posix()
        try:
            samples = _tar_samples(tar_path)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield record(
                index,
                src.name,
                rel,
                str(tar_path),
                precheck=UNREADABLE_TAR,
                precheck_detail=f"{type(exc).__name__}: {exc}",
                license=src.license,
            )
            continue
        for key, members in samples:
            meta = members.get("meta", {})
            fields = {
                "id": _text(meta.get("id")),
                "caption": members.get("caption") or _text(meta.get("caption")),
                "license": _text(meta.get("license")) or src.license,
                "origin": _text(meta.get("source") or meta.get("url")),
            }
            locator = f"{rel}/{key}"
            image = members.get("image")
            if image is None:
                yield record(
                    index,
                    src.name,
                    locator,
                    f"{tar_path}#{key}",
                    precheck=NO_IMAGE_IN_SAMPLE,
                    precheck_detail=f"no {'/'.join(IMAGE_EXTENSIONS)} member for key {key}",
                    **fields,
                )
                continue
            name, offset, size = image
            yield record(
                index, src.name, locator, f"{tar_path}#{name}", kind="tar", tar_offset=offset, tar_size=size, **fields
            )


def _tar_samples(tar_path: Path) -> list[tuple[str, dict]]:
    """Group the members of an uncompressed tar by WebDataset key (path up to the first dot of
    the basename). Images are referenced by offset; .txt and .json members are read (small)."""
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            key = f"{directory}/{stem}" if directory else stem
            entry = samples.setdefault(key, {})
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and "image" not in entry:
                entry["image"] = (member.name, member.offset_data, member.size)
            elif ext in ("txt", "caption"):
                entry["caption"] = _text(tar.extractfile(member).read(1 << 16).decode("utf-8", "replace"))
            elif ext == "json":
                try:
                    meta = json.loads(tar.extractfile(member).read(1 << 20))
                    entry["meta"] = meta if isinstance(meta, dict) else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    entry["meta"] = {}
    return sorted(samples.items())


def enumerate_sources(sources, demo_dir: Path) -> Iterator[dict]:
    for index, src in enumerate(sources):
        if isinstance(src, FolderSource):
            yield from enumerate_folder(index, src)
        elif isinstance(src, TableSource):
            yield from enumerate_table(index, src)
        elif isinstance(src, WebDatasetSource):
            yield from enumerate_webdataset(index, src)
        elif isinstance(src, DemoSource):
            table = demo.ensure_demo(src, demo_dir / src.name)
            yield from enumerate_table(index, TableSource(kind="table", name=src.name, path=table, license=src.license))
        else:  # pragma: no cover - the config's discriminated union makes this unreachable
            raise TypeError(f"unknown source {src!r}")

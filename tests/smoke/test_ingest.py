"""Ingest end to end on local Ray: real photos, a bad-input zoo, a table with URLs served over
real HTTP, and a WebDataset tar. Every input lands in exactly one of manifest and rejects."""

import io
import json
import os
import shutil
import tarfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import debug_config
from httpfixture import ImageServer
from sfumato.data.ingest import run_ingest
from zoo import zoo_files


def _variant(path, k: int) -> bytes:
    """A new JPEG made from a real photo (a distinct file, not a copy of a flowers input)."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((160 + k, 120)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, flowers_dir, cifar_dir, ray_local):
    tmp = tmp_path_factory.mktemp("ingest")
    photos = sorted(flowers_dir.rglob("*.jpg"))
    photo = photos[0].read_bytes()
    # Folder source: the zoo, a symlink out of the root, and an exact copy of a flower photo.
    zoo_dir = tmp / "zoo" / "odd_things"
    zoo_dir.mkdir(parents=True)
    expected = {}
    for name, (data, reason) in zoo_files(photo).items():
        (zoo_dir / name).write_bytes(data)
        expected[f"odd_things/{name}"] = reason
    expected["odd_things/good.jpg"] = "exact_duplicate"  # zoo's good.jpg is flowers' first photo
    (tmp / "outside.jpg").write_bytes(photos[1].read_bytes())
    os.symlink(tmp / "outside.jpg", zoo_dir / "escape.jpg")
    expected["odd_things/escape.jpg"] = "path_escapes_root"
    shutil.copy(photos[2], zoo_dir / "copy_of_flower.jpg")
    expected["odd_things/copy_of_flower.jpg"] = "exact_duplicate"
    # Table source: local paths, URLs on a local server, and policy violations.
    table_root = tmp / "table"
    table_root.mkdir()
    (table_root / "a.jpg").write_bytes(_variant(photos[3], 3))
    (table_root / "b.jpg").write_bytes(_variant(photos[4], 4))
    server = ImageServer({"u1.jpg": _variant(photos[5], 5), "u2.jpg": _variant(photos[6], 6)})
    server.__enter__()  # up for the whole module: the re-ingest test downloads again
    rows = [
        ("a.jpg", "t-1", "a flower", "CC-BY-4.0", None),
        ("b.jpg", "t-1", "same id again", "CC-BY-4.0", "duplicate_id"),
        ("../outside.jpg", "t-2", None, "CC-BY-4.0", "path_escapes_root"),
        ("b.jpg", "t-3", None, None, "missing_license"),
        ("b.jpg", "t-4", None, "All-Rights-Reserved", "license_not_allowed"),
        (None, "t-5", None, "CC-BY-4.0", "missing_path"),
        (f"{server.url}/img/u1.jpg", "t-6", "from the web", "cc-by-4.0", None),
        (f"{server.url}/flaky/1/u2.jpg", "t-7", None, "CC-BY-4.0", None),
        (f"{server.url}/img/gone.jpg", "t-8", None, "CC-BY-4.0", "http_error"),
        ("ftp://example.invalid/x.jpg", "t-9", None, "CC-BY-4.0", "unsupported_scheme"),
    ]
    pd.DataFrame(rows, columns=["path", "id", "caption", "license", "expect"]).to_csv(
        table_root / "list.csv", index=False
    )
    # WebDataset source: two good samples, one without an image, one corrupt tar.
    wds = tmp / "wds"
    wds.mkdir()
    _tar(
        wds / "part-0.tar",
        [
            ("s1.jpg", _variant(photos[7], 7)),
            ("s1.txt", b"caption from txt"),
            ("s2.jpg", _variant(photos[8], 8)),
            ("s2.json", json.dumps({"caption": "from json", "license": "CC0-1.0"}).encode()),
            ("s3.txt", b"no image here"),
        ],
    )
    (wds / "part-1.tar").write_bytes(b"definitely not a tar archive" * 40)
    sources = [
        {"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"},
        {
            "kind": "folder",
            "name": "cifar",
            "path": str(cifar_dir),
            "license": "research-only",
            "caption_template": "a photo of a {tag}",
        },
        {"kind": "folder", "name": "zoo", "path": str(tmp / "zoo"), "license": "CC0-1.0"},
        {"kind": "table", "name": "table", "path": str(table_root / "list.csv")},
        {"kind": "webdataset", "name": "wds", "path": str(wds), "license": "CC-BY-4.0"},
    ]
    cfg = debug_config(tmp, sources)
    summary = run_ingest(cfg)
    out = cfg.data.output_dir
    yield {
        "cfg": cfg,
        "summary": summary,
        "expected_zoo": expected,
        "table_rows": rows,
        "manifest": pq.read_table(out / "manifest.parquet").to_pandas(),
        "rejects": pq.read_table(out / "rejects.parquet").to_pandas(),
        "inputs": len(list(flowers_dir.rglob("*.jpg")))
        + len(list(cifar_dir.rglob("*.jpg")))
        + len(expected)
        + len(rows)
        + 4,  # wds: 3 samples + 1 unreadable tar
    }
    server.__exit__(None, None, None)


def test_every_input_is_accounted_for_exactly_once(ingested):
    manifest, rejects = ingested["manifest"], ingested["rejects"]
    inputs = ingested["inputs"]
    assert len(manifest) + len(rejects) == inputs == ingested["summary"].inputs
    assert manifest["id"].is_unique
    assert not set(manifest["uri"]) & set(rejects["uri"][rejects["reason"] != "duplicate_id"])


def test_zoo_members_get_their_reasons(ingested):
    manifest, rejects = ingested["manifest"], ingested["rejects"]
    zoo_rejects = rejects[rejects["source"] == "zoo"].set_index("locator")["reason"].to_dict()
    zoo_accepted = set(manifest.loc[manifest["source"] == "zoo", "uri"].map(lambda u: u.split("/zoo/")[1]))
    for name, reason in ingested["expected_zoo"].items():
        if reason is None:
            assert name in zoo_accepted, f"{name} should be accepted, got {zoo_rejects.get(name)}"
        else:
            assert zoo_rejects.get(name) == reason, f"{name}: expected {reason}"
    detail = rejects.set_index("locator").loc["odd_things/copy_of_flower.jpg"]
    flower_ids = set(manifest.loc[manifest["source"] == "flowers", "id"])
    assert detail["duplicate_of"] in flower_ids


def test_table_rows_get_their_reasons(ingested):
    manifest, rejects = ingested["manifest"], ingested["rejects"]
    table_rejects = rejects[rejects["source"] == "table"]
    for i, (_path, row_id, _c, _l, reason) in enumerate(ingested["table_rows"]):
        locator = f"row{i:012d}"
        got = table_rejects.loc[table_rejects["locator"] == locator, "reason"].tolist()
        if reason is None:
            assert not got and row_id in set(manifest["id"]), f"row {i} should be accepted, got {got}"
        else:
            assert got == [reason], f"row {i}"
    web = manifest.set_index("id").loc["t-6"]
    assert web["license"] == "CC-BY-4.0", "licence normalised to the allow-list spelling"
    assert web["uri"].startswith("http://127.0.0.1") and os.path.exists(web["filepath"])
    assert "t-7" in set(manifest["id"]), "a 503 is retried"


def test_webdataset_samples(ingested):
    manifest, rejects = ingested["manifest"], ingested["rejects"]
    wds = manifest[manifest["source"] == "wds"].set_index("caption")
    assert set(wds.index) == {"caption from txt", "from json"}
    assert wds.loc["from json", "license"] == "CC0-1.0"
    reasons = sorted(rejects.loc[rejects["source"] == "wds", "reason"])
    assert reasons == ["no_image_in_sample", "unreadable_tar"]


def test_real_photos_metadata(ingested, flowers_dir):
    manifest = ingested["manifest"]
    flowers = manifest[manifest["source"] == "flowers"]
    assert len(flowers) == len(list(flowers_dir.rglob("*.jpg")))
    row = flowers.iloc[0]
    assert row["caption"] == f"a photo of a {row['tags'][-1]}"
    assert row["license"] == "CC-BY-2.0" and row["format"] == "JPEG"
    assert len(row["sha256"]) == 64 and row["width"] >= 64 and row["status"] == "ok"
    assert pd.isna(row["nsfw_flag"]), "nsfw_flag stays unknown until curation sets it"
    cifar = manifest[manifest["source"] == "cifar"]
    assert set(cifar["width"]) == {32} and len({t[-1] for t in cifar["tags"]}) == 10
    rotated = manifest[manifest["uri"].str.endswith("rotated.jpg")].iloc[0]
    assert (rotated["width"], rotated["height"]) == (40, 60)


def test_reingest_gives_the_same_ids(ingested, ray_local):
    again = run_ingest(ingested["cfg"])
    manifest = pq.read_table(ingested["cfg"].data.output_dir / "manifest.parquet").to_pandas()
    assert again.accepted == len(ingested["manifest"])
    assert list(manifest["id"]) == list(ingested["manifest"]["id"])

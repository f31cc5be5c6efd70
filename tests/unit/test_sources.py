"""Folder enumeration: the records ingest starts from. Only a file that is itself a link can leave
the root (the walk does not enter linked folders), so only links are resolved; these tests hold
that shortcut to the full check's answers."""

import os

from sfumato.config import FolderSource
from sfumato.data.sources import PATH_ESCAPES_ROOT, enumerate_folder


def _source(path, **extra):
    return FolderSource.model_validate(
        {"kind": "folder", "name": "photos", "path": str(path), "license": "CC-BY-4.0", **extra}
    )


def test_records_are_sorted_tagged_and_captioned_by_their_folders(tmp_path):
    for rel in ("b_roses/2.jpg", "b_roses/1.jpg", "a_daisy/x/3.jpg", "top.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    records = list(enumerate_folder(3, _source(tmp_path, caption_template="a photo of a {tag}")))
    assert [r["locator"] for r in records] == ["top.jpg", "a_daisy/x/3.jpg", "b_roses/1.jpg", "b_roses/2.jpg"]
    by = {r["locator"]: r for r in records}
    assert by["a_daisy/x/3.jpg"]["tags"] == ["a daisy", "x"]
    assert by["a_daisy/x/3.jpg"]["caption"] == "a photo of a x"
    assert by["top.jpg"]["tags"] == [] and by["top.jpg"]["caption"] is None
    assert by["b_roses/1.jpg"]["uri"] == str(tmp_path / "b_roses" / "1.jpg")
    assert all(r["source_index"] == 3 and r["license"] == "CC-BY-4.0" and r["precheck"] is None for r in records)
    # Records of one folder do not share their tag list (a stage may edit one row's tags).
    assert by["b_roses/1.jpg"]["tags"] is not by["b_roses/2.jpg"]["tags"]


def test_links_are_judged_by_where_they_point(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "cls").mkdir(parents=True)
    outside.mkdir()
    (root / "cls" / "real.jpg").write_bytes(b"x")
    (outside / "secret.jpg").write_bytes(b"x")
    os.symlink(root / "cls" / "real.jpg", root / "cls" / "inner_link.jpg")
    os.symlink(outside / "secret.jpg", root / "cls" / "escape.jpg")
    os.symlink(outside, root / "linked_folder")  # not walked: nothing under it is listed
    by = {r["locator"]: r for r in enumerate_folder(0, _source(root))}
    assert set(by) == {"cls/real.jpg", "cls/inner_link.jpg", "cls/escape.jpg"}
    assert by["cls/inner_link.jpg"]["precheck"] is None
    assert by["cls/escape.jpg"]["precheck"] == PATH_ESCAPES_ROOT
    assert str(outside / "secret.jpg") in by["cls/escape.jpg"]["precheck_detail"]


def test_a_root_reached_through_a_link_is_still_the_root(tmp_path):
    (tmp_path / "real" / "cls").mkdir(parents=True)
    (tmp_path / "real" / "cls" / "a.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "real" / "cls" / "a.jpg", tmp_path / "real" / "cls" / "b.jpg")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    records = list(enumerate_folder(0, _source(tmp_path / "alias")))
    assert [(r["locator"], r["precheck"]) for r in records] == [("cls/a.jpg", None), ("cls/b.jpg", None)]

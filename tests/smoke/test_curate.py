"""`sfumato dedup` end to end on local Ray: real flower photos plus near-duplicates made from them,
a tiny randomly initialised CLIPModel saved as a local pretrained folder (the real loading code).

A random CLIP is not semantic: distinct photos reach cosine 0.9989 under this one, so the default
threshold (0.95) would merge almost everything. Its copies are closer still (re-encoded or
upscaled copy to original: at least 0.9997, measured on these photos with this seeded model), so
the test sets the threshold between the two, at 0.9993, and then checks the whole stage: every
accepted row embedded once, every copy clustered with its original and nothing else, the keeper
rule, the manifest marks matching the report, shards skipping dropped rows, and a re-run changing
nothing. Search quality on embeddings with known structure: tests/unit/test_neardup.py."""

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("faiss")

from helpers import debug_config  # noqa: E402
from sfumato.cli import main  # noqa: E402
from sfumato.data.embed import load_embeddings  # noqa: E402
from sfumato.data.ingest import run_ingest  # noqa: E402
from sfumato.data.shards import run_shards  # noqa: E402
from sfumato.testing.tiny import save_tiny_clip  # noqa: E402


@pytest.fixture(scope="module")
def curated(tmp_path_factory, flowers_dir, ray_local):
    tmp = tmp_path_factory.mktemp("curate")
    save_tiny_clip(tmp / "clip")
    copies = tmp / "copies"
    originals = sorted(flowers_dir.rglob("*.jpg"))[::6]  # 10 photos, 2 of each class
    for n, path in enumerate(originals):
        img = Image.open(path).convert("RGB")
        if n % 2:  # an upscaled copy: more pixels, so the copy must be the keeper
            img = img.resize((int(img.width * 1.25), int(img.height * 1.25)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        target = copies / path.parent.name / f"copy-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buf.getvalue())
    sources = [
        {"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"},
        {"kind": "folder", "name": "copies", "path": str(copies), "license": "CC-BY-4.0"},
    ]
    overrides = [
        f"data.curate.clip.model={tmp / 'clip'}",
        "data.curate.clip.batch_size=16",
        "data.curate.dedup.threshold=0.9993",
    ]
    cfg = debug_config(tmp, sources, *overrides)
    run_ingest(cfg)
    args = [
        "dedup",
        "--config",
        "configs/debug.yaml",
        f"data.output_dir={tmp / 'data'}",
        f"data.sources={json.dumps(sources)}",
        *overrides,
        "--review",
        "3",
    ]
    assert main(args) == 0
    return cfg, originals, args


def test_dedup_marks_the_manifest_as_its_report_says(curated):
    cfg, originals, _ = curated
    out = cfg.data.output_dir
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    report = json.loads((out / "dedup_report.json").read_text())
    ids, emb = load_embeddings(out)
    assert sorted(ids) == sorted(manifest["id"]) and len(ids) == 70, "every accepted row embedded once"
    assert emb.dtype.name == "float16"
    assert abs(float((emb.astype("float32") ** 2).sum(1).mean()) - 1) < 1e-2, "L2-normalised"
    by_path = manifest.set_index("filepath")
    for n, path in enumerate(originals):
        copy = next(p for p in by_path.index if p.endswith(f"copy-{path.name}"))
        cluster = by_path.loc[str(path), "near_dup_cluster"]
        assert by_path.loc[copy, "near_dup_cluster"] == cluster, f"copy of {path.name} not found"
        assert (by_path["near_dup_cluster"] == cluster).sum() == 2, f"{path.name}'s cluster took in other photos"
        if n % 2:  # an upscaled copy has more pixels: it is kept, the original dropped
            assert by_path.loc[copy, "status"] == "ok" and by_path.loc[str(path), "status"] == "near_duplicate"
    dropped = manifest[manifest["status"] == "near_duplicate"]
    assert report["clusters"] == len(originals) and len(dropped) == report["dropped"] == len(originals)
    for cluster in report["cluster_list"]:
        members = manifest.set_index("id").loc[[m["id"] for m in cluster["members"]]]
        pixels = members["width"] * members["height"]
        assert pixels[cluster["keeper"]] == pixels.max(), "the keeper has the most pixels"
        assert (members.drop(index=cluster["keeper"])["near_dup_of"] == cluster["keeper"]).all()
        assert members.loc[cluster["keeper"], "status"] == "ok"
        assert (members["near_dup_cluster"] == cluster["cluster"]).all()
    assert (out / "dedup_review.png").exists()
    assert run_shards(cfg).samples == 70 - len(dropped), "shards skip the dropped rows"
    counts = json.loads((out / "shards" / "class_counts.json").read_text())
    weights = json.loads((out / "shards" / "class_weights.json").read_text())
    kept_tags = manifest.loc[manifest["status"] == "ok", "tags"].map(lambda t: t[-1]).value_counts().to_dict()
    assert counts == kept_tags, "class counts are of the rows that reach the shards"
    assert weights == {t: pytest.approx(min(counts.values()) / n) for t, n in counts.items()}


def test_rerun_skips_embedding_and_changes_nothing(curated):
    cfg, _, args = curated
    out = cfg.data.output_dir
    meta = (out / "embeddings" / "meta.json").stat().st_mtime_ns
    before = pq.read_table(out / "manifest.parquet").to_pandas()
    report = (out / "dedup_report.json").read_text()
    assert main(args) == 0
    assert (out / "embeddings" / "meta.json").stat().st_mtime_ns == meta, "embeddings were complete: not redone"
    assert (out / "dedup_report.json").read_text() == report
    after = pq.read_table(out / "manifest.parquet").to_pandas()
    assert after.drop(columns="date_collected").equals(before.drop(columns="date_collected"))


def test_caption_modes_record_origin_and_keep_the_source_caption(tmp_path, flowers_dir, ray_local):
    from sfumato.data.caption import run_caption
    from sfumato.testing.tiny import save_tiny_blip

    save_tiny_blip(tmp_path / "blip")
    photos = sorted(flowers_dir.rglob("*.jpg"))
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for path in photos[:6]:
        (uncaptioned / f"u-{path.name}").write_bytes(path.read_bytes())
    sources = [
        {"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"},
        {"kind": "folder", "name": "bare", "path": str(uncaptioned), "license": "CC-BY-2.0", "caption_template": None},
    ]
    model = [f"data.curate.caption.model={tmp_path / 'blip'}", "data.curate.caption.max_new_tokens=6"]
    run_ingest(debug_config(tmp_path, sources))

    def manifest():
        return pq.read_table(tmp_path / "data" / "manifest.parquet").to_pandas().set_index("id")

    before = manifest()
    bare = before["source"] == "bare"
    assert before.loc[bare, "caption"].isna().all() and before.loc[~bare, "caption"].notna().all()

    fill = debug_config(tmp_path, sources, *model, "data.curate.caption.mode=fill", "data.curate.caption.trigger=sfm")
    assert run_caption(fill)["generated"] == bare.sum()
    after = manifest()
    assert (after.loc[bare, "caption_origin"] == f"model:{tmp_path / 'blip'}").all()
    assert (after.loc[~bare, "caption_origin"] == "source").all()
    assert (after.loc[~bare, "caption"] == "sfm " + before.loc[~bare, "caption"]).all(), "given captions kept"
    assert after["caption"].str.startswith("sfm ").all()
    assert (after.loc[bare, "caption_source"].isna()).all()
    run_caption(fill)  # again: the trigger is not prepended twice, the greedy captions are the same
    assert manifest()["caption"].equals(after["caption"])

    keep = debug_config(tmp_path, sources, "data.curate.caption.mode=keep")
    assert run_caption(keep)["generated"] == 0
    kept = manifest()
    assert kept["caption"].equals(before["caption"]), "keep restores exactly what the sources said"
    assert (kept.loc[bare, "caption_origin"] == "none").all()

    replace = debug_config(tmp_path, sources, *model, "data.curate.caption.mode=replace")
    assert run_caption(replace)["generated"] == len(before)
    assert (manifest()["caption_origin"] == f"model:{tmp_path / 'blip'}").all()


def test_safety_scores_flags_and_filters_from_the_embeddings(tmp_path, flowers_dir, ray_local):
    import numpy as np
    from safetensors.numpy import save_file

    from sfumato.data.embed import load_embeddings
    from sfumato.data.safety import run_safety

    save_tiny_clip(tmp_path / "clip")
    sources = [{"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"}]
    clip = f"data.curate.clip.model={tmp_path / 'clip'}"
    run_ingest(debug_config(tmp_path, sources))

    def manifest():
        return pq.read_table(tmp_path / "data" / "manifest.parquet").to_pandas().set_index("id")

    # Identical unsafe and safe prompt sets: by symmetry every image scores exactly 0.5.
    same = ["a photo of a flower", "a garden"]
    run_safety(
        debug_config(
            tmp_path,
            sources,
            clip,
            f"data.curate.safety.unsafe_prompts={same}",
            f"data.curate.safety.safe_prompts={same}",
            "data.curate.safety.nsfw_threshold=0.6",
        )
    )
    m = manifest()
    np.testing.assert_allclose(m["nsfw_score"], 0.5, atol=1e-6)
    assert not m["nsfw_flag"].any() and (m["status"] == "ok").all()

    # Default prompts: scores are probabilities; the flag is exactly score >= threshold.
    rng = np.random.default_rng(0)
    head = {
        "layers.0.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "layers.0.bias": np.zeros(8, np.float32),
        "layers.1.weight": rng.standard_normal((1, 8)).astype(np.float32),
        "layers.1.bias": np.ones(1, np.float32),
    }
    save_file(head, str(tmp_path / "aesthetic.safetensors"))
    threshold = float(np.median(m["nsfw_score"]))  # whatever the random model says: half flagged
    cfg = debug_config(
        tmp_path,
        sources,
        clip,
        f"data.curate.safety.nsfw_threshold={threshold}",
        f"data.curate.safety.aesthetic_weights={tmp_path / 'aesthetic.safetensors'}",
    )
    summary = run_safety(cfg)
    m = manifest()
    assert m["nsfw_score"].between(0, 1).all()
    assert (m["nsfw_flag"] == (m["nsfw_score"] >= threshold)).all()
    assert ((m["status"] == "unsafe") == m["nsfw_flag"]).all() and summary["unsafe_dropped"] == m["nsfw_flag"].sum() > 0
    ids, emb = load_embeddings(tmp_path / "data")
    x = emb.astype(np.float32)
    expected = np.maximum(x @ head["layers.0.weight"].T, 0) @ head["layers.1.weight"].T[:, 0] + 1
    np.testing.assert_allclose(m.loc[ids, "aesthetic_score"], expected, rtol=1e-4, atol=1e-4)

    # A minimum aesthetic score drops the rest below it; a re-run without filters restores every row.
    floor = float(np.median(expected))
    run_safety(
        debug_config(
            tmp_path,
            sources,
            clip,
            "data.curate.safety.drop_nsfw=false",
            f"data.curate.safety.aesthetic_weights={tmp_path / 'aesthetic.safetensors'}",
            f"data.curate.safety.min_aesthetic={floor}",
        )
    )
    m = manifest()
    assert ((m["status"] == "low_aesthetic") == (m["aesthetic_score"] < floor)).all()
    run_safety(debug_config(tmp_path, sources, clip, "data.curate.safety.drop_nsfw=false"))
    m = manifest()
    assert (m["status"] == "ok").all() and m["aesthetic_score"].isna().all()

"""Reports and cards carry the real numbers: the dataset card's counts are the manifest's and the
rejects' (checked against pyarrow group-bys here), the model card's parameter count is the
checkpoint's, its device-hours leave out the idle gap of a restart, evaluations show the features
each distance was measured on, and a report survives a run folder that holds only its config.

The data folder is made by ingest's own per-row code (`IngestWorker`, `split_duplicates`) on real
flower photos plus inputs that must be rejected, without Ray; the curation marks are then set as
dedup and safety set them."""

import csv
import json
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("torch")

from helpers import debug_config  # noqa: E402
from sfumato.config import write_resolved  # noqa: E402
from sfumato.data.ingest import INPUT_SCHEMA, IngestWorker, split_duplicates  # noqa: E402
from sfumato.data.manifest import REJECTS_SCHEMA, write_manifest  # noqa: E402
from sfumato.data.sources import enumerate_sources  # noqa: E402
from sfumato.evaluate.cards import write_dataset_card, write_model_card  # noqa: E402
from sfumato.evaluate.report import evenly_spread, training_compute, write_report  # noqa: E402
from sfumato.layout import DataFolder  # noqa: E402

NSFW_THRESHOLD, MIN_AESTHETIC = 0.5, 3.0
EVALUATIONS = [
    {
        "time": 1200.0,
        "checkpoint": "step-00000010",
        "step": 10,
        "features": "inception-v3-compat",
        "metric": "FID",
        "fd": 123.456,
        "clip_score": None,
        "clip_score_model": None,
        "num_samples": 64,
        "sampler": "ddim",
        "steps": 20,
        "guidance_scale": 1.0,
        "seed": 0,
        "reference": {"count": 60, "cache": "ref.npz"},
    },
    {
        "time": 1300.0,
        "checkpoint": "step-00000010",
        "step": 10,
        "features": "clip:tiny-clip",
        "metric": "FD-CLIP",
        "fd": 7.891,
        "clip_score": 0.2468,
        "clip_score_model": "tiny-clip",
        "num_samples": 64,
        "sampler": "ddim",
        "steps": 20,
        "guidance_scale": 2.0,
        "guidance_interval": [0.2, 0.8],
        "seed": 0,
        "reference": {"count": 60, "cache": "ref-clip.npz"},
    },
]
# Tensors of the newest committed checkpoint (net: 8*3*3*3 + 8 + 11*16, text_encoder: 5*7).
EMA_SHAPES = {
    "net.conv.weight": (8, 3, 3, 3),
    "net.conv.bias": (8,),
    "net.emb.weight": (11, 16),
    "text_encoder.w": (5, 7),
}


def _inputs(tmp, flowers_dir) -> tuple[list[dict], int]:
    """Real photos of three classes, plus a copy, a cut-off file, a text file, a tiny image,
    unlicensed and not-allowed rows, and caption-less images; returns (sources, files made)."""
    photos = tmp / "photos"
    for cls in ("daisy", "roses", "tulips"):
        (photos / cls).mkdir(parents=True)
        for path in sorted((flowers_dir / cls).glob("*.jpg"))[:3]:
            shutil.copy(path, photos / cls / path.name)
    first = sorted(photos.rglob("*.jpg"))[0]
    shutil.copy(first, photos / "daisy" / "zz-copy.jpg")
    (photos / "tulips" / "cut.jpg").write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    (photos / "roses" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(photos / "roses" / "tiny.png")
    rng = np.random.default_rng(0)
    for folder, count in (("plain", 2), ("unlicensed", 2), ("restricted", 1)):
        (tmp / folder).mkdir()
        for k in range(count):
            Image.fromarray(rng.integers(0, 255, (40 + 8 * k, 48, 3), dtype=np.uint8)).save(tmp / folder / f"{k}.png")
    sources = [
        {"kind": "folder", "name": "flowers", "path": str(photos), "license": "CC-BY-2.0"},
        {"kind": "folder", "name": "plain", "path": str(tmp / "plain"), "license": "CC0-1.0"},
        {"kind": "folder", "name": "unlicensed", "path": str(tmp / "unlicensed")},
        {"kind": "folder", "name": "restricted", "path": str(tmp / "restricted"), "license": "All-Rights-Reserved"},
    ]
    return sources, 9 + 4 + 2 + 2 + 1


def _curate(manifest):
    """What dedup, safety and caption write: one near-duplicate, one unsafe, one low-aesthetic row."""
    n = len(manifest)
    manifest["near_dup_cluster"] = [0, 0] + [None] * (n - 2)
    manifest["near_dup_of"] = [None, manifest["id"].iloc[0]] + [None] * (n - 2)
    manifest.loc[1, "status"] = "near_duplicate"
    manifest["nsfw_score"] = [0.01 * (k + 1) for k in range(n)]
    manifest.loc[2, "nsfw_score"] = 0.8
    manifest["nsfw_flag"] = manifest["nsfw_score"] >= NSFW_THRESHOLD
    manifest.loc[2, "status"] = "unsafe"
    manifest["aesthetic_score"] = [5.0 + 0.1 * k for k in range(n)]
    manifest.loc[3, "aesthetic_score"] = 2.0
    manifest.loc[3, "status"] = "low_aesthetic"
    manifest["caption_source"] = manifest["caption"]
    manifest["caption_origin"] = manifest["caption"].notna().map({True: "source", False: "none"})
    uncaptioned = manifest.index[manifest["caption"].isna()][0]
    manifest.loc[uncaptioned, ["caption", "caption_origin"]] = ["a generated caption", "model:tiny-blip"]
    return manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory, flowers_dir):
    tmp = tmp_path_factory.mktemp("cards")
    sources, files = _inputs(tmp, flowers_dir)
    cfg = debug_config(
        tmp,
        sources,
        f"train.output_dir={tmp / 'run'}",
        f"data.curate.safety.nsfw_threshold={NSFW_THRESHOLD}",
        f"data.curate.safety.min_aesthetic={MIN_AESTHETIC}",
    )
    out = cfg.data.output_dir
    out.mkdir(parents=True)
    write_resolved(cfg, out / "ingest.config.yaml")
    # run_ingest without Ray: the same per-row worker and duplicate split, then the same two files.
    records = pa.Table.from_pylist(list(enumerate_sources(cfg.data.sources, out / "demo")), schema=INPUT_SCHEMA)
    results = IngestWorker(cfg.data.ingest, str(out / "blobs"))(records).to_pandas()
    accepted, rejected = split_duplicates(results)
    now = pd.Timestamp("2025-01-01", tz="UTC")
    accepted = _curate(accepted.reset_index(drop=True).assign(date_collected=now))
    write_manifest(accepted, DataFolder(out).manifest)
    rejected = rejected.assign(date_collected=now)[REJECTS_SCHEMA.names]
    pq.write_table(pa.Table.from_pandas(rejected, schema=REJECTS_SCHEMA, preserve_index=False), DataFolder(out).rejects)
    (out / "dedup_report.json").write_text(
        json.dumps(
            {
                "threshold": 0.95,
                "method": "exact",
                "model": "tiny-clip",
                "images": len(accepted) - 2,
                "pairs": 1,
                "clusters": 1,
                "dropped": 1,
                "keeper_rule": "most pixels, then license_preference order, then smallest id",
            }
        )
    )
    ok = accepted[accepted["status"] == "ok"]
    (out / "shards").mkdir()
    with (out / "shards" / "shard_manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["shard", "resolution_px", "sample_count", "bytes", "sha256"])
        for res in (16, 32):
            writer.writerows(
                [
                    [f"{res}/shard-000000.tar", res, 4, 1000, "a"],
                    [f"{res}/shard-000001.tar", res, len(ok) - 4, 700, "b"],
                ]
            )
    tags = [t[-1] for t in ok["tags"] if len(t)]
    (out / "shards" / "class_counts.json").write_text(json.dumps({t: tags.count(t) for t in sorted(set(tags))}))
    return cfg, files


def _count_by(table: pa.Table, column: str) -> dict:
    return {row[column]: row["count_all"] for row in table.group_by(column).aggregate([([], "count_all")]).to_pylist()}


def _valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()


def test_dataset_card_counts_are_the_manifests_and_rejects(data):
    cfg, files = data
    out = cfg.data.output_dir
    card = write_dataset_card(out)
    counts = json.loads((out / "dataset_card.json").read_text())
    text = card.read_text()
    manifest, rejects = pq.read_table(DataFolder(out).manifest), pq.read_table(DataFolder(out).rejects)
    assert counts["inputs"] == files == manifest.num_rows + rejects.num_rows, "every input file is counted once"
    by_status = _count_by(manifest, "status")
    assert {k: v for k, v in counts["by_status"].items() if v} == by_status
    assert by_status["near_duplicate"] == by_status["unsafe"] == by_status["low_aesthetic"] == 1
    by_reason = _count_by(rejects, "reason")
    assert counts["rejects_by_reason"] == by_reason
    assert {"exact_duplicate", "missing_license", "license_not_allowed", "not_an_image", "too_small"} <= set(by_reason)
    for reason, n in by_reason.items():
        assert f"| {reason} | {n:,} |" in text
    ok = manifest.filter(pc.equal(manifest["status"], "ok"))
    assert counts["training_images"] == ok.num_rows and f"status `ok` (training images) | {ok.num_rows} |" in text
    for name in ("flowers", "plain", "unlicensed", "restricted"):
        mine = pc.equal(manifest["source"], name)
        expected = manifest.filter(mine).num_rows + rejects.filter(pc.equal(rejects["source"], name)).num_rows
        assert counts["sources"][name]["inputs"] == expected
        assert counts["sources"][name]["licenses"] == _count_by(ok.filter(pc.equal(ok["source"], name)), "license")
    assert counts["licenses"] == _count_by(ok, "license") == {"CC-BY-2.0": 6, "CC0-1.0": 2}
    assert (
        counts["dedup"]["clusters"] == 1 and counts["dedup"]["dropped"] == counts["dedup"]["near_duplicate_rows"] == 1
    )
    safety = counts["safety"]
    assert safety["nsfw_flagged"] == pc.sum(manifest["nsfw_flag"]).as_py() == 1
    assert safety["nsfw_threshold"] == NSFW_THRESHOLD and safety["min_aesthetic"] == MIN_AESTHETIC
    assert "1 flagged at threshold 0.5, 1 excluded" in text
    shorter = pc.min_element_wise(ok["width"], ok["height"]).to_pylist()
    assert sum(counts["resolution"]["shorter_side_px"].values()) == ok.num_rows
    assert counts["resolution"]["shorter_side_px"]["32–63"] == sum(32 <= s < 64 for s in shorter) == 2
    captioned = pc.sum(pc.invert(pc.is_null(ok["caption"]))).as_py()
    assert counts["captions"]["with_caption"] == captioned == 7
    assert (
        counts["captions"]["origin"]
        == _count_by(ok, "caption_origin")
        == {"source": 6, "model:tiny-blip": 1, "none": 1}
    )
    assert counts["shards"]["32"] == {"tars": 2, "samples": ok.num_rows, "bytes": 1700}
    _valid_png(out / "dataset_card_resolution.png")


def test_dataset_card_says_which_curation_stages_did_not_run(data, tmp_path):
    out = data[0].data.output_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    manifest = pq.read_table(DataFolder(out).manifest)
    pq.write_table(
        manifest.select([n for n in manifest.column_names if n not in ("nsfw_score", "aesthetic_score")]),
        DataFolder(bare).manifest,
    )
    shutil.copy(DataFolder(out).rejects, DataFolder(bare).rejects)
    text = write_dataset_card(bare).read_text()
    counts = json.loads((bare / "dataset_card.json").read_text())
    assert counts["dedup"] is None and counts["safety"] is None and counts["shards"] is None
    assert "Not run: no dedup_report.json" in text and "No image was screened" in text
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        write_dataset_card(tmp_path)


def _metrics(times: bool, grad_norm: bool = True) -> list[dict]:
    """Two attempts (a crash after step 6, a resume from step 5); each line closes a 2-step
    window of step_time_s * 2 seconds that ends at its `time`. Idle gap: 1030 -> 1100."""
    rows = [(2, 1010, 5.0), (4, 1020, 5.0), (6, 1030, 5.0), (6, 1112, 6.0), (8, 1122, 5.0), (10, 1130, 4.0)]
    lines = []
    for step, time, step_time_s in rows:
        line = {
            "step": step,
            "stage": int(step >= 6),
            "resolution_px": 32 if step >= 6 else 16,
            "loss": 1.0 / step,
            "loss_ema": 1.2 / step,
            "lr": 1e-3,
            "grad_norm": 0.5 * step if grad_norm else None,
            "samples_per_s": 16 / step_time_s,
            "step_time_s": step_time_s,
            "effective_batch": 16,
            "memory_mb": 900.0,
        }
        lines.append({**line, "time": float(time), "world_size": 2} if times else line)
    return lines


def _run(cfg, name: str, metrics: list[dict] | None, complete: bool = True):
    run = cfg.data.output_dir.parent / name
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": run})})
    write_resolved(cfg, run / "config.yaml")
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 12, "lo')
    if not complete:
        return run
    (run / "attempts.jsonl").write_text(
        '{"time": 1000.0, "resumed_from": null, "world_size": 2}\n'
        '{"time": 1100.0, "resumed_from": "step-00000005", "world_size": 2}\n'
    )
    (run / "samples").mkdir()
    for step in range(1, 9):
        Image.new("RGB", (32, 32), (30 * step, 80, 200 - 20 * step)).save(run / "samples" / f"step-{step:08d}.png")
    from safetensors.numpy import save_file

    for step, shapes, committed in (
        (5, {"net.a": (3, 4)}, True),
        (10, EMA_SHAPES, True),
        (15, {"net.big": (99, 99)}, False),
    ):
        folder = run / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(folder / "ema.safetensors"))
        if committed:
            (folder / "COMMITTED").write_text(str(step))
    (run / "evaluation").mkdir()
    Image.new("RGB", (64, 64)).save(run / "evaluation" / "samples-step-00000010.png")
    (run / "evaluation" / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVALUATIONS))
    return run


def test_device_hours_count_training_windows_not_the_restart_gap(data):
    cfg = data[0]
    timed = training_compute(_run(cfg, "timed", _metrics(times=True)))
    untimed = training_compute(_run(cfg, "untimed", _metrics(times=False)))
    windows_s = sum(m["step_time_s"] * cfg.train.log_every_steps for m in _metrics(times=False))
    assert windows_s == 60 and 1130 - 1000 == 130, "the idle gap after the crash is 70 s of the 130 s elapsed"
    for compute in (timed, untimed):
        assert compute["wall_s"] == pytest.approx(60)
        assert compute["device_hours"] == pytest.approx(60 * cfg.train.num_workers / 3600)
    assert (
        timed["attempts"] == untimed["attempts"] == 2 and timed["elapsed_s"] == 130 and timed["device"] == "CPU worker"
    )


def test_report_plots_curves_samples_and_evaluations(data):
    run = _run(data[0], "full", _metrics(times=True))
    text = write_report(run).read_text()
    for name in ("loss", "lr", "grad_norm", "throughput", "samples_over_steps"):
        _valid_png(run / "report" / f"{name}.png")
        assert f"(report/{name}.png)" in text
    assert evenly_spread(list(range(1, 9)), 6) == [1, 2, 4, 5, 7, 8] and evenly_spread([3], 6) == [3]
    links = re.findall(r"\]\((samples/step-\d+\.png)\)", text)
    assert len(links) == 8 and all((run / link).is_file() for link in links)
    assert (
        "| steps done / configured | 10 / 10 |" in text
        and "2 start(s), 1 restart(s), resumed from step-00000005" in text
    )
    fid = next(line for line in text.splitlines() if "| FID |" in line)
    assert "inception-v3-compat" in fid and "123.5" in fid
    clip = next(line for line in text.splitlines() if "| FD-CLIP |" in line)
    assert "| 2 at noise [0.2, 0.8] |" in clip and "at noise" not in fid, "guidance and the levels it was limited to"
    assert "clip:tiny-clip" in text and "not comparable" in text
    assert "[step-00000010](evaluation/samples-step-00000010.png)" in text


def test_report_survives_a_run_with_only_its_config(data):
    sparse = _run(data[0], "sparse", None, complete=False)
    text = write_report(sparse).read_text()
    assert "Not evaluated yet" in text and "No metrics.jsonl lines yet" in text and "No sample grids" in text
    no_grad = _run(data[0], "no-grad", _metrics(times=True, grad_norm=False), complete=False)
    text = write_report(no_grad).read_text()
    assert "not plotted, metrics.jsonl has no values of `grad_norm`" in text
    assert not (no_grad / "report" / "grad_norm.png").exists() and (no_grad / "report" / "loss.png").is_file()
    assert "Not evaluated yet" in write_model_card(sparse).read_text()


def test_model_card_has_the_checkpoints_parameters_and_the_data_cards_counts(data):
    cfg = data[0]
    data_card = write_dataset_card(cfg.data.output_dir)
    counts = json.loads(data_card.with_name("dataset_card.json").read_text())
    run = _run(cfg, "card", _metrics(times=True))
    text = write_model_card(run).read_text()
    params = sum(int(np.prod(s)) for s in EMA_SHAPES.values())
    assert (
        f"| parameters | {params:,} (net: 400, text_encoder: 35), from the shapes in checkpoints/step-00000010/" in text
    )
    assert f"{60 * 2 / 3600:.3g} CPU worker-hours" in text
    link = re.search(r"\[Dataset card\]\(([^)]+)\)", text).group(1)
    assert (run / link).resolve() == data_card.resolve()
    assert f"{counts['training_images']:,} training images from {counts['inputs']:,} inputs" in text
    assert f"from scratch on {counts['training_images']:,} images at 32 px" in text
    assert "FD-CLIP on features `clip:tiny-clip`: not an FID" in text and "| 7.891 |" in text
    assert "| 2 at noise [0.2, 0.8] |" in text, "the evaluation's guidance interval"
    assert "1 flagged at threshold 0.5, 1 excluded" in text and "| CC-BY-2.0 | 6 |" in text


def test_a_folder_without_config_is_not_a_run(tmp_path):
    for write in (write_report, write_model_card, training_compute):
        with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a run folder"):
            write(tmp_path)


def test_cards_show_a_runs_source_mixture_configured_and_realised(data):
    from sfumato.evaluate.cards import write_run_documents

    cfg = data[0]
    sources = [s.model_copy(update={"weight": w}) for s, w in zip(cfg.data.sources, (3, 1, 0, 0))]
    weighted = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})
    shares = {"flowers": 0.7431, "plain": 0.2569, "unlicensed": 0.0, "restricted": 0.0}
    run = _run(weighted, "mixture", [{**m, "source_shares": shares} for m in _metrics(times=True)])
    documents = write_run_documents(run, cfg.data.output_dir)
    card = documents["dataset_card"].read_text()
    assert "## Source mixture (training draws)" in card and f"Run `{cfg.name}`" in card
    assert "| flowers | 0.75 | 0.743 |" in card and "| plain | 0.25 | 0.257 |" in card
    assert json.loads(documents["dataset_card"].with_suffix(".json").read_text())["mixture"]["realised"] == shares
    assert "Drawn in the mixture flowers 75%, plain 25%, unlicensed 0%" in documents["model_card"].read_text()
    # A run without weights leaves the dataset card without a mixture.
    assert (
        "Source mixture"
        not in write_run_documents(_run(cfg, "plain-run", _metrics(times=True)), cfg.data.output_dir)[
            "dataset_card"
        ].read_text()
    )

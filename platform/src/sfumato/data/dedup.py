"""`sfumato dedup`: near-duplicate removal on CLIP image embeddings.

Embeds the manifest (if its embeddings are not complete), finds pairs at or above
`data.curate.dedup.threshold` cosine, joins them into clusters and keeps one row per cluster
(most pixels, then preferred licence, then id). The manifest marks every clustered row with
`near_dup_cluster`, and each dropped one with status `near_duplicate` and `near_dup_of` (its
keeper); shards skip them. Nothing is deleted from disk. dedup_report.json lists every cluster
with its members, pair scores and keeper. Re-running replaces the previous marks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sfumato.config import Config
from sfumato.data.embed import load_embeddings, run_embed
from sfumato.data.manifest import NEAR_DUPLICATE, OK, write_manifest
from sfumato.data.neardup import SearchSettings, candidate_pairs, choose_keepers, clusters
from sfumato.layout import DataFolder, atomic_write_json, commit_file, temporary_sibling

log = logging.getLogger(__name__)


def run_dedup(cfg: Config, review: int = 0) -> dict:
    data, dcfg = DataFolder(cfg.data.output_dir), cfg.data.curate.dedup
    out = data.root
    run_embed(cfg)
    ids, emb = load_embeddings(out, "image")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")  # by id: stable cluster numbers
    ids, emb = [ids[k] for k in order], emb[order]
    manifest = pq.read_table(data.manifest).to_pandas()
    if "near_dup_cluster" in manifest:  # a previous dedup: start again from its input
        manifest.loc[manifest["status"] == NEAR_DUPLICATE, "status"] = OK
        manifest = manifest.drop(columns=["near_dup_cluster", "near_dup_of"])
    candidates = set(manifest.loc[manifest["status"] == OK, "id"])  # not rows safety dropped
    keep = [k for k, rid in enumerate(ids) if rid in candidates]
    ids, emb = [ids[k] for k in keep], emb[keep]
    if len(ids) != len(candidates):
        raise RuntimeError("the embeddings do not cover the manifest's accepted rows; re-run `sfumato dedup`")
    rows = manifest.set_index("id").loc[ids]
    settings = SearchSettings(
        threshold=dcfg.threshold, exact_max=dcfg.exact_max, nlist=dcfg.nlist, nprobe=dcfg.nprobe, seed=cfg.seed
    )
    i, j, score, method = candidate_pairs(emb, settings)
    labels = clusters(len(ids), i, j)
    prefer = {lic: rank for rank, lic in enumerate(dcfg.license_preference)}
    license_rank = np.array([prefer.get(lic, len(prefer)) for lic in rows["license"]])
    pixels = rows["width"].to_numpy(np.int64) * rows["height"].to_numpy(np.int64)
    kept = choose_keepers(labels, pixels, license_rank, ids)

    sizes = pd.Series(labels).value_counts()
    multi = sorted(int(label) for label in sizes[sizes > 1].index)
    number = {label: n for n, label in enumerate(multi)}
    keeper_of = {labels[r]: ids[r] for r in range(len(ids)) if kept[r]}
    cluster_col = {ids[r]: number[labels[r]] for r in range(len(ids)) if labels[r] in number}
    dropped = {ids[r]: keeper_of[labels[r]] for r in range(len(ids)) if not kept[r]}
    manifest["near_dup_cluster"] = manifest["id"].map(cluster_col).astype("Int64")
    manifest["near_dup_of"] = manifest["id"].map(dropped)
    manifest.loc[manifest["id"].isin(dropped.keys()), "status"] = NEAR_DUPLICATE

    members: dict[int, list[int]] = {label: [] for label in multi}
    for r, label in enumerate(labels):
        if label in members:
            members[label].append(r)
    pairs: dict[int, list[dict]] = {label: [] for label in multi}
    for a, b, s in zip(i.tolist(), j.tolist(), score.tolist()):
        pairs[labels[a]].append({"a": ids[a], "b": ids[b], "score": round(s, 4)})
    report = {
        "threshold": dcfg.threshold,
        "method": method,
        "model": cfg.data.curate.clip.model,
        "images": len(ids),
        "pairs": int(len(i)),
        "clusters": len(multi),
        "dropped": len(dropped),
        "keeper_rule": "most pixels, then license_preference order, then smallest id",
        "cluster_list": [
            {
                "cluster": number[label],
                "keeper": keeper_of[label],
                "members": [
                    {
                        "id": ids[r],
                        "width": int(rows["width"].iloc[r]),
                        "height": int(rows["height"].iloc[r]),
                        "license": rows["license"].iloc[r],
                        "filepath": rows["filepath"].iloc[r],
                        "kept": bool(kept[r]),
                    }
                    for r in members[label]
                ],
                "pairs": pairs[label],
                "max_score": max(p["score"] for p in pairs[label]),
            }
            for label in multi
        ],
    }
    write_manifest(manifest, data.manifest)
    atomic_write_json(data.dedup_report, report)
    if review:
        contact_sheet(report["cluster_list"], review, data.dedup_review)
    log.info(
        "dedup: %d images, %d pairs >= %.3f, %d clusters, %d dropped (%s)",
        len(ids),
        len(i),
        dcfg.threshold,
        len(multi),
        len(dropped),
        method,
    )
    return {k: v for k, v in report.items() if k != "cluster_list"}


def contact_sheet(cluster_list: list[dict], top: int, path: Path, thumb: int = 96) -> None:
    """The `top` borderline clusters (lowest best score: closest to the threshold) as rows of
    thumbnails for a person to check; the keeper is framed green, dropped ones red."""
    from PIL import Image, ImageDraw

    chosen = sorted(cluster_list, key=lambda c: c["max_score"])[:top]
    width = max((len(c["members"]) for c in chosen), default=1)
    sheet = Image.new("RGB", (width * (thumb + 8) + 8, max(1, len(chosen)) * (thumb + 24) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for row, cluster in enumerate(chosen):
        y = 8 + row * (thumb + 24)
        draw.text((8, y), f"cluster {cluster['cluster']}  best cosine {cluster['max_score']:.3f}", fill="black")
        for col, member in enumerate(cluster["members"]):
            x = 8 + col * (thumb + 8)
            with Image.open(member["filepath"]) as img:
                tile = img.convert("RGB")
                tile.thumbnail((thumb, thumb))
            sheet.paste(tile, (x, y + 14))
            draw.rectangle(
                [x - 2, y + 12, x + thumb + 1, y + 14 + thumb + 1],
                outline="green" if member["kept"] else "red",
                width=2,
            )
    tmp = temporary_sibling(path)
    sheet.save(tmp, "PNG")
    commit_file(tmp, path)

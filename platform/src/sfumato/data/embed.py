"""CLIP embeddings of the manifest's images and captions, as a Ray Data stage.

`ClipEmbedder` loads transformers' `CLIPModel` (hub id or local folder: OpenAI CLIP and LAION
OpenCLIP checkpoints in transformers format, safetensors only) once per actor of a pool sized
from the config, and turns batches of manifest rows into L2-normalised float16 vectors. The
driver streams the results into parquet parts under embeddings/{image,text}/ (id, embedding), a
bounded number of rows per part, so no corpus-sized array is ever built; `meta.json`, written
last, marks the set complete for this model and manifest, and a re-run with both unchanged
skips the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import ray

from sfumato.config import Config
from sfumato.data.decode import DecodeLimits, decode_image
from sfumato.data.manifest import ACCEPTED_STATUSES
from sfumato.layout import DataFolder, atomic_write_json, commit_file, temporary_sibling
from sfumato.runtime import cluster_cpus, init_ray

log = logging.getLogger(__name__)

ROWS_PER_PART = 100_000


class ClipEmbedder:
    """Ray Data stage: manifest rows (id, filepath, caption) -> image and caption embeddings."""

    def __init__(self, model_source: str, limits: DecodeLimits | None = None, device: str = "cpu"):
        """`limits`: how manifest files are decoded (__call__); not needed for embed_images/texts."""
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.torch = torch
        self.limits = limits
        self.device = device
        self.model = CLIPModel.from_pretrained(model_source, use_safetensors=True).eval().to(device)
        self.processor = CLIPImageProcessor.from_pretrained(model_source)
        self.tokenizer = AutoTokenizer.from_pretrained(model_source)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __call__(self, batch: dict) -> dict:
        images = []
        for path in batch["filepath"]:
            with open(path, "rb") as fh:  # the ingest decode: EXIF orientation, sRGB, 8-bit RGB
                images.append(decode_image(fh.read(), self.limits, draft_px=224).image)
        captions = [c or "" for c in batch["caption"]]
        return {
            "id": batch["id"],
            "image": self.embed_images(images).astype(np.float16),
            "text": self.embed_texts(captions).astype(np.float16),
            "has_caption": np.array([bool(c) for c in captions]),
        }

    def embed_images(self, images: list) -> np.ndarray:
        """L2-normalised float32 image embeddings of RGB images (PIL images or uint8 HWC arrays):
        the manifest's files here, generated images in the serving safety filter."""
        with self.torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            return _normalised(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 text embeddings (captions here, zero-shot prompts in safety)."""
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with self.torch.no_grad():
            return _normalised(self.model.get_text_features(**tokens))


def _normalised(features) -> np.ndarray:
    if not hasattr(features, "norm"):  # transformers 5 may return an output object
        features = features.pooler_output
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def _embeddable(manifest: Path, columns: list[str]) -> pa.Table:
    table = pq.read_table(manifest, columns=[*columns, "status"])
    keep = pa.compute.is_in(table.column("status"), value_set=pa.array(ACCEPTED_STATUSES))
    return table.filter(keep).drop_columns(["status"])


def manifest_fingerprint(manifest: Path) -> str:
    """Ids and content hashes of the embeddable rows, in order: what the embeddings depend on
    (not the dedup marks, so dedup's own manifest update does not invalidate them)."""
    table = _embeddable(manifest, ["id", "sha256"])
    digest = hashlib.sha256()
    for rid, sha in zip(table.column("id").to_pylist(), table.column("sha256").to_pylist()):
        digest.update(f"{rid}\0{sha}\n".encode())
    return digest.hexdigest()


def embeddings_complete(out: Path, model: str) -> dict | None:
    data = DataFolder(out)
    if not data.embeddings_meta.exists():
        return None
    meta = json.loads(data.embeddings_meta.read_text())
    if meta["model"] != model or meta["manifest"] != manifest_fingerprint(data.manifest):
        return None
    return meta


class _PartWriter:
    """Parquet parts of at most ROWS_PER_PART rows, each written to a temp name then renamed."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("part-*.parquet"):
            old.unlink()
        self.folder, self.parts, self.rows, self.pending = folder, 0, 0, []

    def add(self, ids: list[str], emb: np.ndarray) -> None:
        if len(ids):
            self.pending.append((ids, emb))
            if sum(len(i) for i, _ in self.pending) >= ROWS_PER_PART:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ids = [i for chunk, _ in self.pending for i in chunk]
        emb = np.concatenate([e for _, e in self.pending])
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
            }
        )
        path = self.folder / f"part-{self.parts:05d}.parquet"
        tmp = temporary_sibling(path)
        pq.write_table(table, tmp)
        commit_file(tmp, path)
        self.parts, self.rows, self.pending = self.parts + 1, self.rows + len(ids), []


def run_embed(cfg: Config) -> dict:
    """Embed every accepted manifest row's image and caption; returns the meta of the set."""
    ccfg = cfg.data.curate.clip
    if ccfg.model is None:
        raise ValueError("data.curate.clip.model is not set: name a CLIP checkpoint (hub id or local folder)")
    out, data = cfg.data.output_dir, DataFolder(cfg.data.output_dir)
    done = embeddings_complete(out, ccfg.model)
    if done is not None:
        log.info("embeddings: complete for this manifest and model, skipped (%s)", data.embeddings)
        return done
    rows = _embeddable(data.manifest, ["id", "filepath", "caption"])
    init_ray(cfg.ray)
    workers = ccfg.num_workers or cluster_cpus()
    per_block = max(ccfg.batch_size, -(-rows.num_rows // (4 * workers)))
    blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)] or [rows]
    dataset = ray.data.from_arrow(blocks).map_batches(
        ClipEmbedder,
        fn_constructor_args=(ccfg.model, DecodeLimits.from_config(cfg.data.ingest), "cuda" if ccfg.num_gpus else "cpu"),
        batch_size=ccfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0 if ccfg.num_gpus else 1,
        num_gpus=ccfg.num_gpus,
    )
    data.embeddings_meta.unlink(missing_ok=True)
    images, texts = _PartWriter(data.embedding_parts("image")), _PartWriter(data.embedding_parts("text"))
    dim = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        ids = [str(i) for i in batch["id"]]
        dim = batch["image"].shape[1]
        images.add(ids, batch["image"])
        captioned = batch["has_caption"].astype(bool)
        texts.add([i for i, c in zip(ids, captioned) if c], batch["text"][captioned])
    images.flush()
    texts.flush()
    if images.rows != rows.num_rows:
        raise RuntimeError(f"embedding lost rows: {rows.num_rows} accepted manifest rows, {images.rows} embedded")
    meta = {
        "model": ccfg.model,
        "manifest": manifest_fingerprint(data.manifest),
        "dim": dim,
        "images": images.rows,
        "captions": texts.rows,
        "dtype": "float16",
        "normalised": "L2",
    }
    atomic_write_json(data.embeddings_meta, meta)
    log.info("embeddings: %d images, %d captions, dim %s -> %s", images.rows, texts.rows, dim, data.embeddings)
    return meta


def load_embeddings(out: Path, kind: str = "image") -> tuple[list[str], np.ndarray]:
    """(ids, float16 [n, dim]) of one kind, parts in order."""
    ids, parts = [], []
    for path in sorted(DataFolder(out).embedding_parts(kind).glob("part-*.parquet")):
        table = pq.read_table(path)
        ids.extend(table.column("id").to_pylist())
        column = table.column("embedding").combine_chunks()
        parts.append(column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size))
    if not parts:
        return [], np.zeros((0, 0), np.float16)
    return ids, np.concatenate(parts)

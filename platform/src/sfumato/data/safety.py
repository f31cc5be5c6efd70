"""`sfumato safety`: an NSFW score and an aesthetic score per image, from its CLIP embedding.

NSFW: zero-shot with the same CLIP model that made the embeddings: the image is compared with
two prompt sets (unsafe, safe), the cosines scaled by the model's own logit scale and
soft-maxed over all prompts; the score is the probability mass of the unsafe set. A score at or
above `safety.nsfw_threshold` sets `nsfw_flag`; `safety.drop_nsfw` also sets status `unsafe`.
Aesthetic: a small MLP head on the embedding (LAION-aesthetic style) whose weights are loaded
from a safetensors file; with no weights the score stays null and no filter applies (an
untrained head would rank images at random). `safety.min_aesthetic` sets status
`low_aesthetic` below it. Shards take only status `ok` rows. Re-running recomputes from the
embeddings and replaces earlier marks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sfumato.config import Config
from sfumato.data.decode import DecodeLimits
from sfumato.data.embed import ClipEmbedder, load_embeddings, run_embed
from sfumato.data.manifest import LOW_AESTHETIC, OK, UNSAFE, write_manifest
from sfumato.layout import DataFolder

log = logging.getLogger(__name__)


class NsfwScorer:
    """CLIP zero-shot: the unsafe prompts' share of the softmax over all prompts, the cosines
    scaled by the model's own logit scale (as CLIP's zero-shot classifier does). The prompts are
    embedded once; the curation stage scores stored embeddings, the serving filter
    (sfumato.serve.safety) the images it is about to send."""

    def __init__(self, clip: ClipEmbedder, unsafe: list[str], safe: list[str]):
        self.clip, self.unsafe_count = clip, len(unsafe)
        self.prompts = clip.embed_texts(list(unsafe) + list(safe))
        self.scale = clip.model.logit_scale.detach().exp().item()

    def __call__(self, image_emb: np.ndarray) -> np.ndarray:
        logits = self.scale * image_emb.astype(np.float32) @ self.prompts.T
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs[:, : self.unsafe_count].sum(axis=1) / probs.sum(axis=1)

    def images(self, images: list) -> np.ndarray:
        """Scores of RGB images (uint8 HWC arrays or PIL images)."""
        return self(self.clip.embed_images(images)) if len(images) else np.zeros(0)


class AestheticHead:
    """Linear layers with ReLU between them, as in LAION's aesthetic predictor; the safetensors
    file holds `layers.<k>.weight` / `layers.<k>.bias` for k = 0, 1, ... (last: one output)."""

    def __init__(self, path: Path):
        from safetensors.numpy import load_file

        weights = load_file(str(path))
        count = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
        if count == 0 or any(f"layers.{k}.weight" not in weights for k in range(count)):
            raise ValueError(
                f"{path}: expected tensors layers.0.weight, layers.0.bias, ... (got {sorted(weights)[:4]})"
            )
        self.layers = [(weights[f"layers.{k}.weight"], weights[f"layers.{k}.bias"]) for k in range(count)]
        if self.layers[-1][0].shape[0] != 1:
            raise ValueError(f"{path}: the last layer must have one output, has {self.layers[-1][0].shape[0]}")

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        x = emb.astype(np.float32)
        for k, (w, b) in enumerate(self.layers):
            if x.shape[1] != w.shape[1]:
                raise ValueError(f"aesthetic head layer {k} expects {w.shape[1]} inputs, gets {x.shape[1]}")
            x = x @ w.T + b
            if k < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x[:, 0]


def run_safety(cfg: Config) -> dict:
    out, scfg = cfg.data.output_dir, cfg.data.curate.safety
    run_embed(cfg)
    ids, emb = load_embeddings(out, "image")
    manifest = pq.read_table(DataFolder(out).manifest).to_pandas()
    manifest.loc[manifest["status"].isin([UNSAFE, LOW_AESTHETIC]), "status"] = OK  # start again
    position = {rid: k for k, rid in enumerate(ids)}
    at = manifest["id"].map(position)
    scored = at.notna().to_numpy()
    rows = at[scored].astype(int).to_numpy()

    nsfw = np.full(len(manifest), np.nan)
    clip = ClipEmbedder(cfg.data.curate.clip.model, DecodeLimits.from_config(cfg.data.ingest))
    nsfw[scored] = NsfwScorer(clip, scfg.unsafe_prompts, scfg.safe_prompts)(emb[rows])
    manifest["nsfw_score"] = nsfw
    manifest["nsfw_flag"] = [None if np.isnan(s) else bool(s >= scfg.nsfw_threshold) for s in nsfw]
    aesthetic = np.full(len(manifest), np.nan)
    if scfg.aesthetic_weights is not None:
        aesthetic[scored] = AestheticHead(scfg.aesthetic_weights)(emb[rows])
    manifest["aesthetic_score"] = aesthetic
    ok = manifest["status"] == OK
    if scfg.drop_nsfw:
        manifest.loc[ok & (manifest["nsfw_flag"] == True), "status"] = UNSAFE  # noqa: E712 (nullable)
    if scfg.min_aesthetic is not None and scfg.aesthetic_weights is not None:
        manifest.loc[(manifest["status"] == OK) & (manifest["aesthetic_score"] < scfg.min_aesthetic), "status"] = (
            LOW_AESTHETIC
        )
    write_manifest(manifest, DataFolder(out).manifest)
    summary = {
        "scored": int(scored.sum()),
        "nsfw_flagged": int((manifest["nsfw_flag"] == True).sum()),  # noqa: E712
        "unsafe_dropped": int((manifest["status"] == UNSAFE).sum()),
        "low_aesthetic_dropped": int((manifest["status"] == LOW_AESTHETIC).sum()),
        "aesthetic": "scored" if scfg.aesthetic_weights is not None else "off (no weights)",
    }
    log.info("safety: %s", summary)
    return summary

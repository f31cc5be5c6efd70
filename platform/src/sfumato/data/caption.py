"""`sfumato caption`: captions from an image-to-text model (BLIP by default) as a Ray Data stage.

Modes (`data.curate.caption.mode`): `keep` uses the sources' captions; `fill` captions only
rows without one; `replace` captions every row. The caption a source gave is kept in
`caption_source`, so re-running with another mode or model starts from it; `caption_origin`
says where each final caption came from (`source`, `model:<id>`, or `none`). An optional
trigger token is prepended to every final caption, once. The model (any transformers
image-to-text checkpoint, by hub id or local folder, safetensors only) is loaded once per actor.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import ray

from sfumato.config import Config
from sfumato.data.decode import DecodeLimits, decode_image
from sfumato.data.manifest import ACCEPTED_STATUSES, write_manifest
from sfumato.layout import DataFolder
from sfumato.runtime import cluster_cpus, init_ray

log = logging.getLogger(__name__)


class Captioner:
    """Ray Data stage: rows (id, filepath) -> generated captions."""

    def __init__(
        self, model_source: str, limits: DecodeLimits, prompt: str | None, max_new_tokens: int, device: str = "cpu"
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_source)
        self.model = AutoModelForImageTextToText.from_pretrained(model_source, use_safetensors=True).eval().to(device)
        self.limits, self.prompt, self.max_new_tokens, self.device = limits, prompt, max_new_tokens, device

    def __call__(self, batch: dict) -> dict:
        images = []
        for path in batch["filepath"]:
            with open(path, "rb") as fh:
                images.append(decode_image(fh.read(), self.limits, draft_px=384).image)
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.device)
        with self.torch.no_grad():  # greedy: the same image gets the same caption on every run
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        if self.prompt:  # conditional captioning echoes the prompt first
            texts = [t[len(self.prompt) :] if t.startswith(self.prompt) else t for t in texts]
        return {"id": batch["id"], "generated": np.array([" ".join(t.split()) for t in texts], dtype=object)}


def run_caption(cfg: Config) -> dict:
    out, ccfg = cfg.data.output_dir, cfg.data.curate.caption
    manifest = pq.read_table(DataFolder(out).manifest).to_pandas()
    if "caption_source" not in manifest:  # first curation run: what the sources said
        manifest["caption_source"] = manifest["caption"]
    given = manifest["caption_source"].fillna("").str.strip()
    eligible = manifest["status"].isin(ACCEPTED_STATUSES)
    wanted = eligible & ({"keep": False, "fill": True, "replace": True}[ccfg.mode])
    if ccfg.mode == "fill":
        wanted &= given == ""
    generated: dict[str, str] = {}
    if wanted.any():
        if ccfg.model is None:
            raise ValueError(
                f"data.curate.caption.mode={ccfg.mode} needs data.curate.caption.model "
                "(a hub id or local folder of an image-to-text model, e.g. Salesforce/blip-image-captioning-base)"
            )
        rows = manifest.loc[wanted, ["id", "filepath"]]
        init_ray(cfg.ray)
        workers = min(ccfg.num_workers or cluster_cpus(), max(1, len(rows) // ccfg.batch_size))
        per_block = max(ccfg.batch_size, -(-len(rows) // (4 * workers)))
        blocks = [rows.iloc[i : i + per_block] for i in range(0, len(rows), per_block)]
        dataset = ray.data.from_pandas(blocks).map_batches(
            Captioner,
            fn_constructor_args=(
                ccfg.model,
                DecodeLimits.from_config(cfg.data.ingest),
                ccfg.prompt,
                ccfg.max_new_tokens,
                "cuda" if ccfg.num_gpus else "cpu",
            ),
            batch_size=ccfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0 if ccfg.num_gpus else 1,
            num_gpus=ccfg.num_gpus,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            generated.update(zip((str(i) for i in batch["id"]), (str(g) for g in batch["generated"])))
        if len(generated) != len(rows):
            raise RuntimeError(f"captioning lost rows: {len(rows)} sent, {len(generated)} returned")
    origin = np.where(given != "", "source", "none").astype(object)
    final = given.to_numpy(dtype=object).copy()
    for k, rid in enumerate(manifest["id"]):
        if rid in generated and generated[rid]:
            final[k], origin[k] = generated[rid], f"model:{ccfg.model}"
    if ccfg.trigger:
        final = np.array([f"{ccfg.trigger} {c}".strip() for c in final], dtype=object)
    manifest["caption"] = [c if c else None for c in final]
    manifest["caption_origin"] = origin
    write_manifest(manifest, DataFolder(out).manifest)
    counts = manifest.loc[eligible, "caption_origin"].value_counts().to_dict()
    log.info("caption: mode %s, %d generated; origins %s", ccfg.mode, len(generated), counts)
    return {"mode": ccfg.mode, "generated": len(generated), "origins": counts}

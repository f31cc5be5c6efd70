"""Dataset and model cards, generated from what the pipeline wrote, never typed by hand.

A card is only worth reading if its numbers are the real ones: the dataset card counts the
manifest and rejects (every input row is in exactly one), the curation marks and reports, and the
shards; it writes the same counts to dataset_card.json, which the model card (and tests) read.
The model card takes the architecture from the run's config and the parameter count from the
newest committed checkpoint's tensor shapes, the compute from `report.training_compute`, the
evaluations from evaluation/metrics.jsonl, and states the limits those numbers have.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

from sfumato.config import load_run_config
from sfumato.data.manifest import ACCEPTED_STATUSES, LOW_AESTHETIC, NEAR_DUPLICATE, OK, UNSAFE
from sfumato.documents import format_duration, new_figure, table
from sfumato.evaluate.report import evaluation_lines, lineage_lines, read_evaluations, training_compute
from sfumato.layout import DataFolder, RunFolder, atomic_write, atomic_write_json, read_json, read_metrics
from sfumato.records import SourceSharesRecord, read_metric_lines

SIDE_EDGES_PX = [0, 32, 64, 128, 256, 512, 1024, 2048]  # shorter-side buckets: [edge, next edge)
QUANTILES = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}


# ------------------------------------------------------------------------- dataset counts
def dataset_counts(data_dir: Path) -> dict:
    """Every count the dataset card shows (JSON-able). Training images are status `ok` rows."""
    data_dir = Path(data_dir)
    folder = DataFolder(data_dir)
    if not folder.manifest.is_file() or not folder.rejects.is_file():
        raise FileNotFoundError(
            f"{data_dir} has no {folder.manifest.name} and {folder.rejects.name}: run `sfumato ingest` into it first"
        )
    manifest = pq.read_table(folder.manifest).to_pandas()
    rejects = pq.read_table(folder.rejects).to_pandas()
    ok = manifest[manifest["status"] == OK]
    statuses = manifest["status"].value_counts()
    return {
        "data_dir": str(data_dir),
        "inputs": len(manifest) + len(rejects),
        "manifest_rows": len(manifest),
        "rejected": len(rejects),
        "training_images": len(ok),
        "by_status": {
            s: int(statuses.get(s, 0))
            for s in [*ACCEPTED_STATUSES, *sorted(set(statuses.index) - set(ACCEPTED_STATUSES))]
        },
        "rejects_by_reason": _counts(rejects["reason"]),
        "sources": _sources(manifest, rejects),
        "licenses": _counts(ok["license"]),
        "resolution": _resolution(ok),
        "captions": _captions(ok),
        "dedup": _dedup(data_dir, manifest),
        "safety": _safety(data_dir, manifest),
        "shards": _shards(data_dir),
        "latent_caches": _latent_caches(data_dir),
        "classes": read_json(folder.shard_folder.class_counts),
    }


def _counts(column: pd.Series) -> dict[str, int]:
    counts = column.fillna("(none)").value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _sources(manifest: pd.DataFrame, rejects: pd.DataFrame) -> dict:
    out = {}
    for name in sorted(set(manifest["source"]) | set(rejects["source"])):
        rows, rejected = manifest[manifest["source"] == name], rejects[rejects["source"] == name]
        ok = rows[rows["status"] == OK]
        out[name] = {
            "inputs": len(rows) + len(rejected),
            "manifest_rows": len(rows),
            "training_images": len(ok),
            "rejected": len(rejected),
            "licenses": _counts(ok["license"]),
        }
    return out


def _resolution(ok: pd.DataFrame) -> dict:
    shorter = ok[["width", "height"]].min(axis=1)
    buckets = pd.cut(shorter, SIDE_EDGES_PX + [float("inf")], right=False)
    labels = [f"{a}–{b - 1}" for a, b in zip(SIDE_EDGES_PX, SIDE_EDGES_PX[1:])] + [f"≥ {SIDE_EDGES_PX[-1]}"]
    per_bucket = buckets.value_counts(sort=False).tolist()
    return {
        "shorter_side_px": dict(zip(labels, map(int, per_bucket))),
        "width_px": _spread(ok["width"]),
        "height_px": _spread(ok["height"]),
    }


def _spread(column: pd.Series) -> dict | None:
    return (
        {"min": int(column.min()), "median": float(column.median()), "max": int(column.max())} if len(column) else None
    )


def _captions(ok: pd.DataFrame) -> dict:
    with_caption = int((ok["caption"].fillna("").str.strip() != "").sum())
    origin = _counts(ok["caption_origin"]) if "caption_origin" in ok else None
    return {"images": len(ok), "with_caption": with_caption, "origin": origin}


def _dedup(data_dir: Path, manifest: pd.DataFrame) -> dict | None:
    report = read_json(DataFolder(data_dir).dedup_report)
    if report is None:
        return None
    keys = ("threshold", "method", "model", "images", "pairs", "clusters", "dropped", "keeper_rule")
    return {
        **{k: report.get(k) for k in keys},
        "near_duplicate_rows": int((manifest["status"] == NEAR_DUPLICATE).sum()),
    }


def _curation_settings(data_dir: Path) -> dict:
    """data.curate as ingest recorded it (ingest.config.yaml): safety writes no settings file of
    its own, so its threshold is the one of the config the pipeline ran with."""
    path = DataFolder(data_dir).ingest_config
    tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return ((tree.get("data") or {}).get("curate") or {}).get("safety") or {}


def _safety(data_dir: Path, manifest: pd.DataFrame) -> dict | None:
    if "nsfw_score" not in manifest or manifest["nsfw_score"].isna().all():
        return None
    scores = manifest["nsfw_score"].dropna()
    flagged, settings = manifest["nsfw_flag"].eq(True), _curation_settings(data_dir)
    threshold = settings.get("nsfw_threshold")
    if threshold is not None and (flagged != (manifest["nsfw_score"] >= threshold))[scores.index].any():
        threshold = None  # the flags were set with another threshold than the recorded one
    aesthetic = manifest["aesthetic_score"].dropna() if "aesthetic_score" in manifest else pd.Series(dtype=float)
    return {
        "scored": len(scores),
        "nsfw_flagged": int(flagged.sum()),
        "nsfw_threshold": threshold,
        "unsafe_rows": int((manifest["status"] == UNSAFE).sum()),
        "nsfw_score": {k: round(float(scores.quantile(q)), 4) for k, q in QUANTILES.items()},
        "aesthetic_scored": len(aesthetic),
        "aesthetic_score": {k: round(float(aesthetic.quantile(q)), 3) for k, q in QUANTILES.items()}
        if len(aesthetic)
        else None,
        "min_aesthetic": settings.get("min_aesthetic"),
        "low_aesthetic_rows": int((manifest["status"] == LOW_AESTHETIC).sum()),
    }


def _shards(data_dir: Path) -> dict | None:
    path = DataFolder(data_dir).shard_folder.manifest
    if not path.is_file():
        return None
    shards = pd.read_csv(path)
    grouped = shards.groupby("resolution_px").agg(
        tars=("shard", "count"), samples=("sample_count", "sum"), bytes=("bytes", "sum")
    )
    return {str(res): {k: int(v) for k, v in row.items()} for res, row in grouped.iterrows()}


def _latent_caches(data_dir: Path) -> list[dict]:
    """The latent caches of these shards (sfumato.models.cache): VAE, stored dtype, bytes per sample."""
    return [read_json(folder.meta) for folder in DataFolder(data_dir).cache_folders()]


# --------------------------------------------------------------------------- dataset card
def _resolution_png(path: Path, shorter_side: dict[str, int]) -> None:
    fig = new_figure(6.0, 2.8)
    ax = fig.add_subplot()
    ax.bar(list(shorter_side), list(shorter_side.values()), color="#4c72b0")
    ax.set(title="Training images by shorter side", xlabel="shorter side (px)", ylabel="images")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _dataset_markdown(c: dict, png_name: str) -> list[str]:
    s = c["by_status"]
    lines = [
        f"# Dataset card: `{c['data_dir']}`",
        "",
        "Generated from the pipeline's outputs (manifest, rejects, curation "
        "marks and reports, shards); the same counts are in dataset_card.json.",
        "",
        "## Counts",
        "",
    ]
    lines += table(
        ["", "rows"],
        [
            ["inputs (manifest + rejects)", c["inputs"]],
            ["rejected at ingest", c["rejected"]],
            ["accepted at ingest (manifest)", c["manifest_rows"]],
        ]
        + [[f"  status `{k}`" + (" (training images)" if k == OK else ""), v] for k, v in s.items()],
    )
    lines += ["## Sources", ""] + table(
        ["source", "inputs", "in manifest", "training images", "rejected", "licences of training images"],
        [
            [
                n,
                v["inputs"],
                v["manifest_rows"],
                v["training_images"],
                v["rejected"],
                ", ".join(f"{lic}: {k:,}" for lic, k in v["licenses"].items()),
            ]
            for n, v in c["sources"].items()
        ],
    )
    lines += ["## Licences (training images)", ""] + table(
        ["licence", "images"], [[k, v] for k, v in c["licenses"].items()]
    )
    lines += ["## Rejects by reason", ""] + (
        table(["reason", "rows"], [[k, v] for k, v in c["rejects_by_reason"].items()])
        if c["rejects_by_reason"]
        else ["No input was rejected.", ""]
    )
    lines += (
        ["## Near-duplicates", ""]
        + _dedup_lines(c["dedup"])
        + ["## Safety and aesthetics", ""]
        + _safety_lines(c["safety"])
    )
    r = c["resolution"]
    lines += ["## Resolution (training images)", ""] + table(
        ["shorter side (px)", "images"], list(map(list, r["shorter_side_px"].items()))
    )
    if r["width_px"]:
        lines += [
            f"Width {r['width_px']['min']}–{r['width_px']['max']} px (median {r['width_px']['median']:g}), "
            f"height {r['height_px']['min']}–{r['height_px']['max']} px (median {r['height_px']['median']:g}).",
            "",
            f"![shorter side histogram]({png_name})",
            "",
        ]
    cap = c["captions"]
    lines += ["## Captions (training images)", "", f"{cap['with_caption']:,} of {cap['images']:,} have a caption.", ""]
    lines += (
        table(["caption origin", "images"], list(map(list, cap["origin"].items())))
        if cap["origin"]
        else ["No captioning stage ran: captions are the sources' own.", ""]
    )
    lines += ["## Shards", ""] + (
        table(
            ["resolution (px)", "samples", "tars", "bytes"],
            [[res, v["samples"], v["tars"], v["bytes"]] for res, v in c["shards"].items()],
        )
        if c["shards"]
        else ["No shards written yet (`sfumato shards`).", ""]
    )
    lines += _cache_lines(c.get("latent_caches") or [])
    lines += _mixture_lines(c.get("mixture"))
    if c["classes"]:
        lines += ["## Classes (in the shards)", ""] + table(
            ["class", "samples"], [[k, v] for k, v in c["classes"].items()]
        )
    return lines


def _mixture_lines(m: dict | None) -> list[str]:
    """data.sources weights: what training draws from each source, configured and realised."""
    if m is None:
        return []
    realised = m.get("realised") or {}
    return [
        "## Source mixture (training draws)",
        "",
        f"Run `{m['run']}` draws each training sample's source with these weights, whatever the sources' sizes; "
        "the realised share is its rank 0's count of draws in the last logged stage.",
        "",
    ] + table(
        ["source", "weight", "realised share"],
        [
            [n, f"{w:.3g}", f"{realised[n]:.3g}" if n in realised else "(not logged yet)"]
            for n, w in m["weights"].items()
        ],
    )


def _cache_lines(caches: list[dict]) -> list[str]:
    """Each latent cache: the VAE it was encoded with and what it costs on disk per sample."""
    if not caches:
        return []

    def model(part: dict | None, subfolder: str) -> str:
        return "—" if part is None else f"`{part['pretrained']}`" + (f" ({part[subfolder]})" if part[subfolder] else "")

    rows = [
        [
            f"`{c['key']}`",
            model(c["vae"], "subfolder"),
            model(c["text"], "encoder_subfolder"),
            c["dtype"],
            res,
            ", ".join(f"{name} {'×'.join(map(str, shape))}" for name, shape in r["shapes"].items()),
            r["samples"],
            r["bytes"],
            f"{r['bytes_per_sample']:,.0f}",
        ]
        for c in caches
        for res, r in c["resolutions"].items()
    ]
    return [
        "## Latent caches",
        "",
        "Each image's VAE posterior (mean and std) and, for a frozen text encoder, its "
        "caption's encoder states, computed once (`sfumato cache`) and read by every run with the same models "
        "instead of running the encoders.",
        "",
    ] + table(
        ["cache", "VAE", "text encoder", "dtype", "resolution (px)", "per sample", "samples", "bytes", "bytes/sample"],
        rows,
    )


def _dedup_lines(d: dict | None) -> list[str]:
    if d is None:
        return ["Not run: no dedup_report.json (`sfumato dedup`). Exact duplicates are still removed at ingest.", ""]
    return [
        f"CLIP image embeddings (`{d['model']}`), {d['method']} search, cosine ≥ {d['threshold']}: "
        f"{d['clusters']:,} clusters among {d['images']:,} images, {d['dropped']:,} dropped "
        f"(status `near_duplicate`). Keeper: {d['keeper_rule']}.",
        "",
    ]


def _safety_lines(s: dict | None) -> list[str]:
    if s is None:
        return ["Not run: the manifest has no NSFW scores (`sfumato safety`). No image was screened.", ""]
    threshold = "unrecorded threshold" if s["nsfw_threshold"] is None else f"threshold {s['nsfw_threshold']}"
    q = s["nsfw_score"]
    lines = [
        f"NSFW (CLIP zero-shot) scored {s['scored']:,} images: {s['nsfw_flagged']:,} flagged at {threshold}, "
        f"{s['unsafe_rows']:,} excluded (status `unsafe`).",
        "",
        "NSFW score quantiles: " + ", ".join(f"{k} {v:.3g}" for k, v in q.items()) + ".",
        "",
    ]
    if s["aesthetic_score"] is None:
        return lines + ["Aesthetic score: not computed (no aesthetic head weights).", ""]
    a = s["aesthetic_score"]
    return lines + [
        f"Aesthetic score ({s['aesthetic_scored']:,} images): "
        + ", ".join(f"{k} {v:.3g}" for k, v in a.items())
        + f"; {s['low_aesthetic_rows']:,} below min_aesthetic={s['min_aesthetic']} (status `low_aesthetic`).",
        "",
    ]


def write_dataset_card(data_dir: Path, out: Path | None = None, mixture: dict | None = None) -> Path:
    """dataset_card.md (default in data_dir), and beside it dataset_card.json (the same
    counts) and dataset_card_resolution.png; returns the card's path. `mixture`
    (`run_mixture`): a run's source weights and realised shares, shown with the sources."""
    counts = dataset_counts(Path(data_dir))
    if mixture is not None:
        counts["mixture"] = mixture
    out = Path(out) if out is not None else DataFolder(data_dir).dataset_card
    out.parent.mkdir(parents=True, exist_ok=True)
    histogram = out.with_name(f"{out.stem}_resolution.png")
    if counts["training_images"]:
        _resolution_png(histogram, counts["resolution"]["shorter_side_px"])
    atomic_write_json(out.with_suffix(".json"), counts)
    return atomic_write(out, "\n".join(_dataset_markdown(counts, histogram.name)))


# ----------------------------------------------------------------------------- model card
def parameter_counts(ema_path: Path) -> dict[str, int]:
    """Elements per top-level module (`net`, `text_encoder`), from the shapes in the
    safetensors header: no tensor is loaded."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(ema_path), framework="numpy") as f:
        for name in f.keys():  # safe_open is not iterable
            module = name.split(".")[0]
            counts[module] = counts.get(module, 0) + math.prod(f.get_slice(name).get_shape())
    return counts


def _family(model: str) -> str:
    from sfumato.models.names import DIT, MMDIT, MODEL_FAMILIES, TEXT_DIT, TEXT_UNET, UNET

    dit = "sfumato's DiT (sfumato.models.dit, shipped in the export's unet/; Peebles & Xie 2023)"
    return {
        UNET: "UNet (diffusers UNet2DModel)",
        TEXT_UNET: "UNet cross-attending to a text encoder (diffusers UNet2DConditionModel)",
        DIT: dit,
        TEXT_DIT: f"{dit}, cross-attending to a text encoder (as PixArt)",
        MMDIT: f"{dit}, joint attention over caption and image tokens (SD3's MMDiT)",
    }[MODEL_FAMILIES[model]]


def _architecture(cfg, run_dir: Path, data: dict | None) -> list[str]:
    from sfumato import checkpoint as ckpt

    t = cfg.train
    folder = RunFolder(run_dir)
    latest = ckpt.latest(folder.checkpoints)
    if latest is None:
        params = "unknown: no committed checkpoint yet"
    else:
        counts = parameter_counts(ckpt.ema_path(latest))
        parts = ", ".join(f"{k}: {v:,}" for k, v in counts.items())
        params = f"{sum(counts.values()):,} ({parts}), from the shapes in {folder.relative(ckpt.ema_path(latest))}"
        if t.lora is not None:
            params = f"LoRA adapters: {params}; the frozen base weights are the lineage's (below)"
    classes = len(data["classes"]) if data and data.get("classes") else "?"
    conditioning = {
        "none": "unconditional",
        "class": f"class label ({classes} classes, from the innermost tag)",
        "text": "caption, through a text encoder "
        + (f"from `{t.text.pretrained}`" if t.text.pretrained else "trained from scratch with the model"),
    }[t.conditioning]
    if t.conditioning != "none":
        conditioning += f"; condition dropped with p={cfg.diffusion.condition_dropout} for classifier-free guidance"
    d = cfg.diffusion
    rows = [
        ["model (registry name)", f"`{t.model}`"],
        ["family", _family(t.model)],
        ["space", f"latent, VAE `{t.vae.pretrained}`" if t.vae else "pixel"],
        ["parameters", params],
        ["conditioning", conditioning],
        ["resolution(s)", ", ".join(f"{s.resolution_px} px" for s in t.stages)],
        [
            "noise schedule",
            f"{d.beta_schedule}, {d.num_train_timesteps} steps"
            + (", zero terminal SNR" if d.zero_terminal_snr else ""),
        ],
        ["prediction type", d.prediction_type],
        ["loss weighting", f"Min-SNR γ={d.min_snr_gamma} (Hang et al. 2023)" if d.min_snr_gamma else "plain MSE"],
        ["noise offset", d.noise_offset],
    ]
    return ["## Architecture and diffusion", ""] + table(["", ""], rows)


def _training(cfg, run_dir: Path) -> list[str]:
    t, compute = cfg.train, training_compute(run_dir)
    metrics = read_metrics(RunFolder(run_dir).metrics)
    ema = f"half-life {t.ema.halflife_samples:,g} images" if t.ema.halflife_samples else f"decay {t.ema.decay}"
    rows = [
        ["steps done / configured", f"{metrics[-1]['step'] if metrics else 0:,} / {t.total_steps:,}"],
        ["effective batch", ", ".join(f"{cfg.train.effective_batch(s)} at {s.resolution_px} px" for s in t.stages)],
        [
            "optimizer",
            f"AdamW, lr {t.optimizer.lr:g} ({t.optimizer.lr_schedule}, {t.optimizer.warmup_steps} warm-up steps)",
        ],
        ["EMA", ema],
        ["precision", t.precision],
        ["ZeRO stage", t.zero_stage],
        [
            "compute",
            f"{compute['device_hours']:.3g} {compute['device']}-hours ({compute['world_size']} × "
            f"{format_duration(compute['wall_s'])} of training; see report.md)",
        ],
    ]
    return ["## Training", ""] + table(["", ""], rows)


def _data_section(data: dict | None, link: str) -> list[str]:
    if data is None:
        return [
            "## Training data",
            "",
            f"No dataset card at `{link}`: write it with `sfumato.evaluate.cards.write_dataset_card(DATA_DIR)`.",
            "",
        ]
    sources = ", ".join(f"{n} ({v['training_images']:,})" for n, v in data["sources"].items())
    return [
        "## Training data",
        "",
        f"[Dataset card]({link}): {data['training_images']:,} training images from "
        f"{data['inputs']:,} inputs ({data['rejected']:,} rejected at ingest, "
        f"{data['manifest_rows'] - data['training_images']:,} removed by curation). Sources: {sources}.",
        "",
    ] + (
        [
            f"Drawn in the mixture {', '.join(f'{n} {w:.0%}' for n, w in data['mixture']['weights'].items())} "
            "(data.sources weights; realised shares in the dataset card).",
            "",
        ]
        if data.get("mixture")
        else []
    )


def _limitations(cfg, data: dict | None, evaluations: list[dict]) -> list[str]:
    images = f"{data['training_images']:,}" if data else "an unknown number of"
    lines = [
        "## Intended use",
        "",
        "Research and demonstration: generating images like the training set, studying training recipes. "
        "Not for depicting real people, for decisions about people, or for production without further review.",
        "",
        "## Limitations",
        "",
        f"- Trained from scratch on {images} images at {cfg.train.stages[-1].resolution_px} px: expect the "
        "quality, diversity and resolution of a small model, and the biases of its training set.",
        "- Samples can reproduce training images, especially with a small dataset.",
    ]
    for metric, features in sorted({(e.get("metric"), e.get("features")) for e in evaluations if e.get("metric")}):
        caveat = (
            "comparable with published FID only if those are the standard Inception-v3 weights and the reference "
            "set and sample count are the same"
            if metric == "FID"
            else "not an FID: not comparable with any published FID"
        )
        lines.append(f"- Evaluated with {metric} on features `{features}`: {caveat}.")
    if any(e.get("compositional") for e in evaluations):
        lines.append(
            "- The GenEval-style accuracies are measured in the demo's world of four shapes and six colours "
            "by a segmenter trained on it: they say how well the model composes that world's prompts, not "
            "how it would score on GenEval's own prompts and detector."
        )
    return lines + [""]


def _mitigations(data: dict | None) -> list[str]:
    lines = ["## Safety mitigations", ""]
    if data is None:
        return lines + ["Unknown: no dataset card.", ""]
    s, d = data["safety"], data["dedup"]
    lines.append(
        "- "
        + (
            "No safety filter was run: the training images were not screened for NSFW content."
            if s is None
            else _safety_lines(s)[0]
        )
    )
    lines.append("- " + ("No near-duplicate removal was run." if d is None else _dedup_lines(d)[0]))
    reasons = data["rejects_by_reason"]
    lines.append(
        f"- Licence policy at ingest: {reasons.get('missing_license', 0):,} inputs without a licence and "
        f"{reasons.get('license_not_allowed', 0):,} with a licence outside the allowlist were rejected; "
        f"{reasons.get('exact_duplicate', 0):,} exact duplicates removed."
    )
    return lines + [""]


def _licences(data: dict | None) -> list[str]:
    if data is None:
        return []
    return (
        ["## Licences of the training data", ""]
        + table(["licence", "images"], [[k, v] for k, v in data["licenses"].items()])
        + ["Their terms (attribution, research-only use) bind whoever distributes these weights or their samples.", ""]
    )


def write_model_card(run_dir: Path, data_card: Path | None = None, out: Path | None = None) -> Path:
    """model_card.md (default in run_dir), linking the dataset card (default: the config's
    data.output_dir/dataset_card.md) by relative path; returns the card's path."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    out = Path(out) if out is not None else RunFolder(run_dir).model_card
    data_card = Path(data_card) if data_card is not None else DataFolder(cfg.data.output_dir).dataset_card
    data = read_json(data_card.with_suffix(".json"))
    link = os.path.relpath(data_card.resolve(), out.parent.resolve())
    evaluations = read_evaluations(run_dir)
    lines = [f"# Model card: {cfg.name}", "", f"Generated from the run folder `{run_dir}`.", ""]
    lines += (
        _architecture(cfg, run_dir, data) + _data_section(data, link) + lineage_lines(cfg) + _training(cfg, run_dir)
    )
    lines += ["## Evaluation", ""] + (
        evaluation_lines(evaluations) if evaluations else [f"Not evaluated yet: run `sfumato evaluate {run_dir}`.", ""]
    )
    lines += _limitations(cfg, data, evaluations) + _mitigations(data) + _licences(data)
    return atomic_write(out, "\n".join(lines))


def run_mixture(run_dir: Path) -> dict | None:
    """A run's data.sources weights and the last logged realised shares (None: no weights)."""
    cfg = load_run_config(run_dir)
    weights = cfg.data.source_weights
    if weights is None:
        return None
    lines = read_metric_lines(RunFolder(run_dir).metrics)
    logged = [line.get(SourceSharesRecord).source_shares for line in lines if line.get(SourceSharesRecord)]
    return {"run": cfg.name, "weights": weights, "realised": logged[-1] if logged else None}


def write_run_documents(run_dir: Path, data_dir: Path) -> dict[str, Path]:
    """report.md, the data's dataset_card.md and model_card.md, rewritten from what the run
    folder and the data folder hold now (after training, evaluation, `sfumato report`)."""
    from sfumato.evaluate.report import write_report

    data_card = write_dataset_card(data_dir, mixture=run_mixture(run_dir))
    return {
        "report": write_report(run_dir),
        "dataset_card": data_card,
        "model_card": write_model_card(run_dir, data_card),
    }

"""The stage registry: every stage `sfumato pipeline` runs and the CLI dispatches, in order.

A stage is a function `(cfg, **options) -> StageResult` (one line for the log, a small JSON
dict of figures), registered with the config keys it reads (what its pipeline fingerprint hashes; a test runs the
stages on a config that records every key read and fails on an undeclared one), the folder its
pipeline record lives in, what it leaves behind, and which files' content is its output hash.

    ingest -> safety -> dedup -> caption -> shards -> cache -> tune -> train -> evaluate -> export
      -> finetune -> align (post-training: off by default)

The pipeline calls a stage with the config alone; `sfumato <stage>` (sfumato.cli) calls the same
function, with the options its flags give (a checkpoint, a parent run, the dedup review): one
definition of each stage, reached by both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfumato.config import Config, ConfigError
from sfumato.layout import DataFolder, ExportFolder, RunFolder, TuneFolder
from sfumato.records import HELDOUT_REWARD_ACCURACY, LOSS_EMA, MetricsLine, QualityRecord

# Where a stage writes, not what it computes: never part of a fingerprint (the record lives in
# that folder), so reading them needs no declaration.
LOCATION_KEYS = ("name", "ray", "pipeline", "data.output_dir", "train.output_dir", "tune.output_dir")


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: the pipeline logs `line` and keeps `values` in the stage's record
    (pipeline/<stage>.json) and summary; `sfumato <stage>` prints `values` as JSON."""

    line: str
    """One line for the log: what the stage did, its main figures."""
    values: dict[str, Any] = field(default_factory=dict)
    """Its figures, JSON-serialisable (paths and numbers)."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]
    keys: tuple[str, ...]
    """Dotted config keys the stage reads (a key covers everything under it)."""
    folder: Callable[[Config], Path]
    """Its output folder, where its pipeline record (pipeline/<name>.json) lives."""
    artifacts: Callable[[Config], dict[str, Path]]
    """What it leaves, by label; all must exist for the pipeline to skip it."""
    produced: Callable[[Config], list[Path]]
    """Files whose content hash is its output hash (what later stages' fingerprints see)."""
    reads: Callable[[Config], list[str]]
    """The stages whose output it reads."""
    enabled: Callable[[Config], str | None]
    """None: it runs; else why it is off."""
    in_pipeline: bool = True
    """False: a CLI stage the pipeline does not run (embed, dataloader)."""


REGISTRY: dict[str, Stage] = {}


def _always(cfg: Config) -> None:
    return None


def stage(
    name: str,
    *,
    keys: tuple[str, ...],
    folder: Callable,
    artifacts: Callable,
    produced: Callable,
    reads: Callable | tuple[str, ...] = (),
    enabled: Callable = _always,
    in_pipeline: bool = True,
):
    """Register the decorated function as the stage `name` (in the order of registration)."""

    def register(run: Callable) -> Callable:
        upstream = reads if callable(reads) else (lambda cfg, fixed=tuple(reads): list(fixed))
        REGISTRY[name] = Stage(name, run, keys, folder, artifacts, produced, upstream, enabled, in_pipeline)
        return run

    return register


def pipeline_stages() -> list[Stage]:
    return [s for s in REGISTRY.values() if s.in_pipeline]


# ----------------------------------------------------------------------------- helpers
def _data(cfg: Config) -> DataFolder:
    return DataFolder(cfg.data.output_dir)


def _run(cfg: Config) -> RunFolder:
    return RunFolder(cfg.train.output_dir)


def _tune(cfg: Config) -> TuneFolder:
    return TuneFolder(cfg.tune.output_dir)


def _data_root(cfg: Config) -> Path:
    return _data(cfg).root


def _run_root(cfg: Config) -> Path:
    return _run(cfg).root


def _curating(cfg: Config) -> str | None:
    return None if cfg.data.curate.clip.model else "data.curate.clip.model is not set"


def _captioning(cfg: Config) -> str | None:
    c = cfg.data.curate.caption
    return None if c.mode != "keep" or c.trigger else "data.curate.caption.mode is keep and no trigger is set"


def _training(cfg: Config) -> str | None:
    return None if cfg.train is not None else "the config has no train section"


DATA_ORDER = ("ingest", "safety", "dedup", "caption", "shards")


def _previous_data_stage(name: str) -> Callable[[Config], list[str]]:
    """The data stages rewrite one manifest in turn: each reads what the last one before it left."""

    def reads(cfg: Config) -> list[str]:
        before = [s for s in DATA_ORDER[: DATA_ORDER.index(name)] if REGISTRY[s].enabled(cfg) is None]
        return before[-1:]

    return reads


# ------------------------------------------------------------------------------- data
@stage(
    "ingest",
    keys=("data.sources", "data.ingest"),
    folder=_data_root,
    artifacts=lambda cfg: {
        "manifest": _data(cfg).manifest,
        "rejects": _data(cfg).rejects,
        "ingest summary": _data(cfg).ingest_summary,
    },
    produced=lambda cfg: [_data(cfg).manifest, _data(cfg).rejects],
)
def ingest(cfg: Config):
    """sources -> manifest.parquet + rejects.parquet (Ray Data)"""
    from sfumato.data.ingest import run_ingest

    summary = run_ingest(cfg)
    return StageResult(summary.line(), summary.__dict__)


@stage(
    "embed",
    keys=("data.ingest", "data.curate.clip"),
    folder=_data_root,
    in_pipeline=False,
    artifacts=lambda cfg: {"embeddings": _data(cfg).embeddings},
    produced=lambda cfg: [_data(cfg).embeddings_meta],
)
def embed(cfg: Config):
    """manifest -> CLIP image and caption embeddings under embeddings/ (Ray Data actors)"""
    from sfumato.data.embed import run_embed

    meta = run_embed(cfg)
    return StageResult(f"embed: {meta['images']} images, {meta['captions']} captions", meta)


@stage(
    "safety",
    keys=("data.ingest", "data.curate.clip", "data.curate.safety"),
    folder=_data_root,
    reads=_previous_data_stage("safety"),
    enabled=_curating,
    artifacts=lambda cfg: {"embeddings": _data(cfg).embeddings},
    produced=lambda cfg: [_data(cfg).manifest],
)
def safety(cfg: Config):
    """NSFW (CLIP zero-shot) and aesthetic scores from the embeddings; filters by threshold"""
    from sfumato.data.safety import run_safety

    result = run_safety(cfg)
    return StageResult(f"safety: {result['unsafe_dropped']} unsafe rows dropped", result)


@stage(
    "dedup",
    keys=("seed", "data.ingest", "data.curate.clip", "data.curate.dedup"),
    folder=_data_root,
    reads=_previous_data_stage("dedup"),
    enabled=_curating,
    artifacts=lambda cfg: {"dedup report": _data(cfg).dedup_report},
    produced=lambda cfg: [_data(cfg).manifest, _data(cfg).dedup_report],
)
def dedup(cfg: Config, review: int = 0):
    """embeddings -> FAISS near-duplicate clusters, dedup_report.json, manifest marks

    `review`: also dedup_review.png, the `review` clusters nearest the threshold."""
    from sfumato.data.dedup import run_dedup

    result = run_dedup(cfg, review)
    return StageResult(f"dedup: {result['dropped']} near-duplicates dropped", result)


@stage(
    "caption",
    keys=("data.ingest", "data.curate.caption"),
    folder=_data_root,
    reads=_previous_data_stage("caption"),
    enabled=_captioning,
    artifacts=lambda cfg: {"manifest (captions)": _data(cfg).manifest},
    produced=lambda cfg: [_data(cfg).manifest],
)
def caption(cfg: Config):
    """manifest captions kept, filled or replaced by an image-to-text model (Ray Data actors)"""
    from sfumato.data.caption import run_caption

    result = run_caption(cfg)
    return StageResult(f"caption: {result['generated']} captions generated", result)


@stage(
    "shards",
    keys=("seed", "data.ingest", "data.shards"),
    folder=_data_root,
    reads=_previous_data_stage("shards"),
    artifacts=lambda cfg: {"shards": _data(cfg).shards, "shard manifest": _data(cfg).shard_folder.manifest},
    produced=lambda cfg: [_data(cfg).shard_folder.manifest, _data(cfg).shard_folder.classes],
)
def shards(cfg: Config):
    """manifest -> WebDataset shards per resolution (Ray Data)"""
    from sfumato.data.shards import run_shards

    summary = run_shards(cfg)
    return StageResult(summary.line(), summary.__dict__)


def _cache_meta(cfg: Config) -> Path:
    from sfumato.models.cache import cache_folder

    return cache_folder(cfg).meta  # written last, when every file of the cache is complete


def _caching(cfg: Config) -> str | None:
    from sfumato.models.cache import cache_enabled

    return cache_enabled(cfg)


@stage(
    "cache",
    keys=("data.cache", "data.shards.buckets", "train.vae", "train.conditioning", "train.text"),
    folder=_data_root,
    reads=("shards",),
    enabled=_caching,
    artifacts=lambda cfg: {"latent cache": _cache_meta(cfg)},
    produced=lambda cfg: [_cache_meta(cfg)],
)
def cache(cfg: Config):
    """shards -> cache: every image's VAE posterior and frozen-encoder caption states, once (Ray Data actors)"""
    from sfumato.models.cache import run_cache

    summary = run_cache(cfg)
    return StageResult(summary.line(), summary.__dict__)


@stage(
    "dataloader",
    keys=("seed", "data.shards", "data.loader"),
    folder=_data_root,
    in_pipeline=False,
    artifacts=lambda cfg: {},
    produced=lambda cfg: [],
)
def dataloader(cfg: Config):
    """stream batches from the shards and report samples/s"""
    from sfumato.data.loader import smoke

    result = smoke(cfg)
    return StageResult(f"dataloader: {result['samples']} samples at {result['resolution_px']} px", result)


# ------------------------------------------------------------------------------ model
@stage(
    "tune",
    keys=("seed", "diffusion", "train", "tune", "evaluate.domain", "evaluate.device"),
    folder=lambda cfg: _tune(cfg).root,
    reads=("shards",),
    enabled=lambda cfg: None if cfg.pipeline.tune else "pipeline.tune is false",
    artifacts=lambda cfg: {"sweep results": _tune(cfg).results_md, "best config": _tune(cfg).best_config},
    produced=lambda cfg: [_tune(cfg).best_config],
)
def tune(cfg: Config, resume: bool | None = None):
    """Ray Tune sweep of the trainer on a proxy run -> results, best_config.yaml

    `resume`: continue the sweep in tune.output_dir (finished trials are kept); None: if this stage
    began one there."""
    from ray.tune import Tuner

    from sfumato.tune.sweep import run_sweep

    if resume is None:
        resume = Tuner.can_restore(_tune(cfg).experiment)  # a sweep this stage began
    result = run_sweep(cfg, resume=resume)
    if "best" not in result:
        raise RuntimeError(
            f"the sweep in {cfg.tune.output_dir} has no completed trial to train from (see {result['results']})"
        )
    best = result["best"]
    return StageResult(
        f"tune: {result['trials']} trials ({result['completed']} completed, {result['stopped_early']} "
        f"stopped early); best {best['trial_id']} val_loss {best['final_val_loss']:.4g}",
        {k: v for k, v in result.items() if k != "trials_by_id"},
    )


def _last_checkpoint(cfg: Config) -> dict[str, Path]:
    from sfumato import checkpoint as ckpt

    run = _run(cfg)
    grids = run.sample_grids()
    return {
        "run folder": run.root,
        "final checkpoint": ckpt.step_dir(run.checkpoints, cfg.train.total_steps),
        "metrics": run.metrics,
        "last sample grid": grids[-1][1] if grids else run.samples / "step-?.png",
    }


def _final_weights(cfg: Config) -> list[Path]:
    from sfumato import checkpoint as ckpt

    return [ckpt.ema_path(_last_checkpoint(cfg)["final checkpoint"])]


# data.cache: whether and in which precision the run reads its latents from the latent cache.
@stage(
    "train",
    # evaluate.domain: the yardstick train.quality scores with (the evaluation's own)
    keys=(
        "seed",
        "diffusion",
        "train",
        "data.sources",
        "data.cache.enabled",
        "data.cache.dtype",
        "evaluate.domain",
        "evaluate.device",
    ),
    folder=_run_root,
    reads=("shards",),
    enabled=_training,
    artifacts=_last_checkpoint,
    produced=_final_weights,
)
def train(cfg: Config):
    """Ray Train + DeepSpeed diffusion training (resumes its run folder)"""
    from sfumato.train.loop import run_training

    last = run_training(cfg)
    line = MetricsLine.from_json(last)
    return StageResult(f"train: step {line.step} of {cfg.train.total_steps}, {LOSS_EMA} {line.value(LOSS_EMA)}", last)


def _feature_network(cfg: Config) -> str | None:
    e = cfg.evaluate
    return e.inception_weights or e.clip_model or cfg.data.curate.clip.model


@stage(
    "evaluate",
    keys=("evaluate", "data.curate.clip.model"),
    folder=_run_root,
    reads=("train",),
    enabled=lambda cfg: _training(cfg) or (None if cfg.pipeline.evaluate else "pipeline.evaluate is false"),
    artifacts=lambda cfg: {
        "report": _run(cfg).report,
        "model card": _run(cfg).model_card,
        "dataset card": _data(cfg).dataset_card,
    },
    produced=lambda cfg: [_run(cfg).report],
)
def evaluate(cfg: Config, checkpoint: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """the offline yardstick, FID / CLIPScore with weights; writes report.md and the cards

    `checkpoint`: which one (default: the newest); `overrides`: dotted keys over the run folder's
    config.yaml, which the evaluation reads (`cfg` must be that config with them applied)."""
    from sfumato.evaluate.cards import write_run_documents
    from sfumato.evaluate.compositional import summary as compositional_summary
    from sfumato.evaluate.domain import summary as domain_summary
    from sfumato.evaluate.evaluate import has_compositional_yardstick, has_domain_yardstick, run_evaluate

    run_dir = _run(cfg).root
    if _feature_network(cfg) or has_domain_yardstick(cfg) or has_compositional_yardstick(cfg):
        record = run_evaluate(run_dir, checkpoint, list(overrides) or None)
        quality = QualityRecord.from_json(record)
        parts = [domain_summary(quality.domain)] if quality.domain else []
        if quality.compositional:
            parts.append(compositional_summary(quality.compositional))
        if quality.fd is not None:
            parts.append(f"{quality.metric} {quality.fd:.2f}")
        else:
            parts.append(
                "no FID or CLIPScore (no feature network: evaluate.inception_weights, evaluate.clip_model "
                "or data.curate.clip.model)"
            )
        if quality.clip_score is not None:
            parts.append(f"CLIPScore {quality.clip_score:.2f}")
        line = f"evaluate: {quality.num_samples} samples, " + ", ".join(parts)
    else:
        write_run_documents(run_dir, cfg.data.output_dir)
        record = {"fd": None}
        line = (
            "evaluate: no FID or CLIPScore (no feature network: evaluate.inception_weights, evaluate.clip_model "
            "or data.curate.clip.model) and no domain yardstick (evaluate.domain off or the data has no classes); "
            "report and cards written"
        )
    if all(src.kind == "demo" for src in cfg.data.sources):
        record["demo_structure"] = d = demo_structure(cfg)
        line += (
            f". Demo structure: {d['samples']:.2f} of the last grid's pixels are in its images' two palette "
            f"colours (training images: {d['training_images']:.2f}; noise: about 0.06)"
        )
    return StageResult(line, record)


def demo_structure(cfg: Config) -> dict:
    """For the demo data, whose images are two flat palette colours: the share of pixels in their
    two palette colours, for the last training grid (the EMA weights, fixed noise) and for the
    training images at the same resolution (data.demo.two_colour_share)."""
    import numpy as np
    from PIL import Image

    from sfumato.data.demo import two_colour_share
    from sfumato.data.loader import iter_batches, shard_paths

    grid_path = _last_checkpoint(cfg)["last sample grid"]
    res, n = cfg.train.stages[-1].resolution_px, cfg.train.sample.num_images
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    columns = grid.shape[1] // res
    tiles = np.stack(
        [
            grid[(i // columns) * res : (i // columns + 1) * res, (i % columns) * res : (i % columns + 1) * res]
            for i in range(n)
        ]
    )
    real = next(iter_batches(shard_paths(_data(cfg).shards, res), 256, res, drop_last=False))["image"]
    return {
        "samples": two_colour_share(tiles),
        "training_images": two_colour_share(real),
        "grid": str(grid_path),
        "resolution_px": res,
    }


@stage(
    "export",
    # evaluate's guidance goes into sfumato.json as Serve's default for a request naming none
    keys=("export", "evaluate.guidance_scale", "evaluate.guidance_interval"),
    folder=_run_root,
    reads=("train",),
    enabled=lambda cfg: _training(cfg) or (None if cfg.pipeline.export else "pipeline.export is false"),
    artifacts=lambda cfg: {"export": _run(cfg).export, "export report": ExportFolder(_run(cfg).export).report_md},
    produced=lambda cfg: [ExportFolder(_run(cfg).export).report_json],
)
def export(cfg: Config, checkpoint: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """a checkpoint's EMA weights as a diffusers folder, ONNX and INT8 under RUN_DIR/export

    `checkpoint` and `overrides` as for evaluate."""
    from sfumato.export.export_run import run_export

    report = run_export(_run(cfg).root, checkpoint, list(overrides) or None)
    onnx = report["onnx"]
    checked = f", ONNX within {onnx['tolerance_max_rel']:.0e} of PyTorch" if onnx else ""
    return StageResult(
        f"export: {report['checkpoint']} -> {_run(cfg).export}{checked}",
        {k: report[k] for k in ("checkpoint", "step", "parameters", "diffusers")},
    )


# ----------------------------------------------------------------------- post-training
def _resolved(resolve: Callable[[], Config]) -> Config:
    """A post-training run's own config, resolved before any work. A wrong lineage, an empty
    selection or an unreadable pairs table is a ConfigError: one line and exit status 2, from
    `sfumato finetune` as from the pipeline, never a traceback."""
    try:
        return resolve()
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err


def _train_report_export(cfg: Config, run_cfg: Config) -> tuple[dict, dict | None]:
    """A post-training run trained, then its report and cards, then its export (pipeline.export)."""
    from sfumato.evaluate.cards import write_run_documents
    from sfumato.export.export_run import run_export
    from sfumato.train.loop import run_training

    last = run_training(run_cfg)
    write_run_documents(run_cfg.train.output_dir, run_cfg.data.output_dir)
    return last, (run_export(run_cfg.train.output_dir) if cfg.pipeline.export else None)


def _finetune_folder(cfg: Config) -> Path:
    return Path(cfg.finetune.overrides["train.output_dir"]).resolve() if cfg.finetune else _run(cfg).root / "finetune"


@stage(
    "finetune",
    keys=("finetune",),
    folder=_finetune_folder,
    reads=("train",),
    enabled=lambda cfg: _training(cfg) or (None if cfg.pipeline.finetune else "pipeline.finetune is false"),
    artifacts=lambda cfg: {
        "fine-tune run folder": _finetune_folder(cfg),
        "fine-tune report": RunFolder(_finetune_folder(cfg)).report,
    },
    produced=lambda cfg: [RunFolder(_finetune_folder(cfg)).report],
)
def finetune(cfg: Config, parent: Path | None = None, checkpoint: str | None = None, pretrained: str | None = None):
    """post-training: fine-tune the run on the finetune.select subset (LoRA with finetune.lora),
    then its report and export

    `parent` (default finetune.parent, else train.output_dir), `checkpoint` (default: its newest) or
    `pretrained` (a diffusers folder or hub id instead of a run): where the weights come from."""
    from sfumato.train.finetune import run_config

    tuned = _resolved(lambda: run_config(cfg, parent, checkpoint, pretrained))
    last, export = _train_report_export(cfg, tuned)
    lineage = tuned.train.lineage
    kind = f"LoRA rank {tuned.train.lora.rank}" if tuned.train.lora else "full weights"
    return StageResult(
        f"finetune: {kind} from {lineage.checkpoint or lineage.pretrained} on {lineage.selected_rows} selected rows, "
        f"step {MetricsLine.from_json(last).step} of {tuned.train.total_steps}, "
        f"{LOSS_EMA} {MetricsLine.from_json(last).value(LOSS_EMA)}" + (f" -> {export['diffusers']}" if export else ""),
        {"run_dir": str(tuned.train.output_dir), "selected_rows": lineage.selected_rows, **last},
    )


def _align_folder(cfg: Config) -> Path:
    return Path(cfg.align.overrides["train.output_dir"]).resolve() if cfg.align else _run(cfg).root / "align"


def _align_reads(cfg: Config) -> list[str]:
    """The alignment of the fine-tune when align.parent names the fine-tune's folder."""
    if (
        cfg.pipeline.finetune
        and cfg.align is not None
        and cfg.align.parent is not None
        and cfg.align.parent.resolve() == _finetune_folder(cfg)
    ):
        return ["finetune"]
    return ["train"]


@stage(
    "align",
    keys=("align",),
    folder=_align_folder,
    reads=_align_reads,
    enabled=lambda cfg: _training(cfg) or (None if cfg.pipeline.align else "pipeline.align is false"),
    artifacts=lambda cfg: {
        "alignment run folder": _align_folder(cfg),
        "alignment report": RunFolder(_align_folder(cfg)).report,
    },
    produced=lambda cfg: [RunFolder(_align_folder(cfg)).report],
)
def align(
    cfg: Config,
    parent: Path | None = None,
    checkpoint: str | None = None,
    pretrained: str | None = None,
    pairs: Path | None = None,
):
    """post-training: Diffusion-DPO of the run (or its fine-tune) on the align.pairs preferences,
    then its report and export

    `parent`, `checkpoint`, `pretrained` as for finetune (default align.parent); `pairs`: the
    preference table (default align.pairs)."""
    from sfumato.train.align import run_config

    aligned = _resolved(lambda: run_config(cfg, parent, checkpoint, pretrained, pairs))
    last, export = _train_report_export(cfg, aligned)
    lineage = aligned.train.lineage
    kind = f"LoRA rank {aligned.train.lora.rank}" if aligned.train.lora else "full weights"
    return StageResult(
        f"align: Diffusion-DPO ({kind}, beta {aligned.train.dpo.beta:g}) "
        f"from {lineage.checkpoint or lineage.pretrained} "
        f"on {lineage.pair_count} pairs, step {MetricsLine.from_json(last).step} of {aligned.train.total_steps}, "
        f"held-out reward accuracy {MetricsLine.from_json(last).value(HELDOUT_REWARD_ACCURACY)}"
        + (f" -> {export['diffusers']}" if export else ""),
        {"run_dir": str(aligned.train.output_dir), "pairs": lineage.pair_count, **last},
    )

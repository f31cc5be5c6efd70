"""`sfumato pipeline --config FILE`: the whole job on one config, data in, an exported model out.

    ingest -> safety -> dedup -> caption -> shards -> tune -> train -> evaluate -> export

Every stage has a fingerprint: a content hash of the config keys it reads, of its external inputs
(the source files' names, sizes and modification times) and of what the stages it reads from
wrote (the content hashes in their records). A finished stage writes its record,
`<its output folder>/pipeline/<stage>.json`: fingerprint, the content hash of what it wrote, its
artifacts and seconds. A later run skips every stage whose record holds the same fingerprint and
whose artifacts are still there, so a re-run after a failure goes on from the stage that failed,
and a changed key reruns the stages that read it and the ones after them (only if what they read
changed: a stage that reran to the same bytes leaves later stages skipped).

Training also resumes inside its stage: a killed run continues from its last checkpoint when its
fingerprint is unchanged. A run folder holding a run of another config or other data is refused,
never continued with a different config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sfumato.config import Config, ConfigError, content_hash, load_config, to_dict, write_resolved

log = logging.getLogger(__name__)

RECORDS = "pipeline"  # per output folder: pipeline/<stage>.json
SUMMARY = "pipeline_summary"  # .json and .md in the run folder (or the data folder)


@dataclass
class Outcome:
    """What one stage did in this run of the pipeline."""

    stage: str
    status: str  # ran | skipped | off
    note: str = ""  # what it did, or why it was off or skipped
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    result: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    enabled: Callable[[Config], str | None]  # None: runs; else why it is off
    folder: Callable[[Config], Path]  # where its record lives (its output folder)
    keys: tuple[str, ...]  # dotted config paths it reads
    reads: Callable[[Config], list[str]]  # the stages whose output it reads
    artifacts: Callable[[Config], dict[str, Path]]  # what it leaves, by label (all must exist to skip)
    produced: Callable[[Config], list[Path]]  # files whose content hash is its output hash
    run: Callable[[Config], tuple[str, dict]]  # -> (one line for the log, a small result dict)


# ------------------------------------------------------------------------------ the stages
def _data(cfg: Config) -> Path:
    return cfg.data.output_dir


def _run_dir(cfg: Config) -> Path:
    return cfg.train.output_dir


def _curating(cfg: Config) -> str | None:
    return None if cfg.data.curate.clip.model else "data.curate.clip.model is not set"


def _captioning(cfg: Config) -> str | None:
    c = cfg.data.curate.caption
    return None if c.mode != "keep" or c.trigger else "data.curate.caption.mode is keep and no trigger is set"


def _training(cfg: Config) -> str | None:
    return None if cfg.train is not None else "the config has no train section"


def _previous_data_stage(name: str) -> Callable[[Config], list[str]]:
    """The data stages rewrite one manifest in turn: each reads what the last one before it left."""
    order = ["ingest", "safety", "dedup", "caption", "shards"]

    def reads(cfg: Config) -> list[str]:
        before = [s for s in order[: order.index(name)] if STAGES_BY_NAME[s].enabled(cfg) is None]
        return before[-1:]

    return reads


def _run_ingest(cfg):
    from sfumato.data.ingest import run_ingest

    summary = run_ingest(cfg)
    return summary.line(), summary.__dict__


def _run_safety(cfg):
    from sfumato.data.safety import run_safety

    result = run_safety(cfg)
    return f"safety: {result['unsafe_dropped']} unsafe rows dropped", result


def _run_dedup(cfg):
    from sfumato.data.dedup import run_dedup

    result = run_dedup(cfg)
    return f"dedup: {result['dropped']} near-duplicates dropped", result


def _run_caption(cfg):
    from sfumato.data.caption import run_caption

    result = run_caption(cfg)
    return f"caption: {result['generated']} captions generated", result


def _run_shards(cfg):
    from sfumato.data.shards import run_shards

    summary = run_shards(cfg)
    return summary.line(), summary.__dict__


def _run_tune(cfg):
    from sfumato.tune.sweep import EXPERIMENT, run_sweep

    from ray.tune import Tuner

    resume = Tuner.can_restore(cfg.tune.output_dir / EXPERIMENT)  # a sweep this stage began
    result = run_sweep(cfg, resume=resume)
    if "best" not in result:
        raise RuntimeError(f"the sweep in {cfg.tune.output_dir} has no completed trial to train from "
                           f"(see {result['results']})")
    best = result["best"]
    return (f"tune: {result['trials']} trials ({result['completed']} completed, {result['stopped_early']} stopped "
            f"early); best {best['trial_id']} val_loss {best['final_val_loss']:.4g}"), \
        {k: v for k, v in result.items() if k != "trials_by_id"}


def _run_train(cfg):
    from sfumato.train.loop import run_training

    last = run_training(cfg)
    return f"train: step {last.get('step')} of {cfg.train.total_steps}, loss_ema {last.get('loss_ema')}", last


def _feature_network(cfg) -> str | None:
    e = cfg.evaluate
    return e.inception_weights or e.clip_model or cfg.data.curate.clip.model


def _run_evaluate(cfg):
    from sfumato.evaluate.cards import write_run_documents
    from sfumato.evaluate.domain import summary as domain_summary
    from sfumato.evaluate.evaluate import has_domain_yardstick, run_evaluate

    run_dir = _run_dir(cfg)
    if _feature_network(cfg) or has_domain_yardstick(cfg):
        record = run_evaluate(run_dir)
        parts = []
        if record.get("domain"):
            parts.append(domain_summary(record["domain"]))
        if record["fd"] is not None:
            parts.append(f"{record['metric']} {record['fd']:.2f}")
        else:
            parts.append("no FID or CLIPScore (no feature network: evaluate.inception_weights, evaluate.clip_model "
                         "or data.curate.clip.model)")
        if record["clip_score"] is not None:
            parts.append(f"CLIPScore {record['clip_score']:.2f}")
        line = f"evaluate: {record['num_samples']} samples, " + ", ".join(parts)
    else:
        write_run_documents(run_dir, cfg.data.output_dir)
        record = {"fd": None}
        line = ("evaluate: no FID or CLIPScore (no feature network: evaluate.inception_weights, evaluate.clip_model "
                "or data.curate.clip.model) and no domain yardstick (evaluate.domain off or the data has no classes); "
                "report and cards written")
    if all(src.kind == "demo" for src in cfg.data.sources):
        record["demo_structure"] = demo_structure(cfg)
        d = record["demo_structure"]
        line += (f". Demo structure: {d['samples']:.2f} of the last grid's pixels are in its images' two palette "
                 f"colours (training images: {d['training_images']:.2f}; noise: about 0.06)")
    return line, record


def demo_structure(cfg) -> dict:
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
    tiles = np.stack([grid[(i // columns) * res:(i // columns + 1) * res, (i % columns) * res:(i % columns + 1) * res]
                      for i in range(n)])
    real = next(iter_batches(shard_paths(cfg.data.output_dir / "shards", res), 256, res, drop_last=False))["image"]
    return {"samples": two_colour_share(tiles), "training_images": two_colour_share(real),
            "grid": str(grid_path), "resolution_px": res}


def _run_export(cfg):
    from sfumato.export.export_run import run_export

    report = run_export(_run_dir(cfg))
    onnx = report["onnx"]
    checked = f", ONNX within {onnx['tolerance_max_rel']:.0e} of PyTorch" if onnx else ""
    return f"export: {report['checkpoint']} -> {_run_dir(cfg) / 'export'}{checked}", \
        {k: report[k] for k in ("checkpoint", "step", "parameters", "diffusers")}


def _last_checkpoint(cfg) -> dict[str, Path]:
    from sfumato.train import checkpoint as ckpt

    run = _run_dir(cfg)
    final = ckpt.step_dir(run / "checkpoints", cfg.train.total_steps)
    grids = sorted((run / "samples").glob("step-*.png"))
    return {"run folder": run, "final checkpoint": final, "metrics": run / "metrics.jsonl",
            "last sample grid": grids[-1] if grids else run / "samples" / "step-?.png"}


STAGES = [
    Stage("ingest", lambda cfg: None, _data, ("data.sources", "data.ingest"), lambda cfg: [],
          lambda cfg: {"manifest": _data(cfg) / "manifest.parquet", "rejects": _data(cfg) / "rejects.parquet",
                       "ingest summary": _data(cfg) / "ingest_summary.json"},
          lambda cfg: [_data(cfg) / "manifest.parquet", _data(cfg) / "rejects.parquet"], _run_ingest),
    Stage("safety", _curating, _data, ("data.curate.clip", "data.curate.safety"), _previous_data_stage("safety"),
          lambda cfg: {"embeddings": _data(cfg) / "embeddings"},
          lambda cfg: [_data(cfg) / "manifest.parquet"], _run_safety),
    Stage("dedup", _curating, _data, ("data.curate.clip", "data.curate.dedup"), _previous_data_stage("dedup"),
          lambda cfg: {"dedup report": _data(cfg) / "dedup_report.json"},
          lambda cfg: [_data(cfg) / "manifest.parquet", _data(cfg) / "dedup_report.json"], _run_dedup),
    Stage("caption", _captioning, _data, ("data.curate.caption",), _previous_data_stage("caption"),
          lambda cfg: {"manifest (captions)": _data(cfg) / "manifest.parquet"},
          lambda cfg: [_data(cfg) / "manifest.parquet"], _run_caption),
    Stage("shards", lambda cfg: None, _data, ("seed", "data.shards"), _previous_data_stage("shards"),
          lambda cfg: {"shards": _data(cfg) / "shards", "shard manifest": _data(cfg) / "shards" / "shard_manifest.csv"},
          lambda cfg: [_data(cfg) / "shards" / "shard_manifest.csv", _data(cfg) / "shards" / "classes.json"],
          _run_shards),
    Stage("tune", lambda cfg: None if cfg.pipeline.tune else "pipeline.tune is false",
          lambda cfg: cfg.tune.output_dir, ("seed", "diffusion", "train", "tune"), lambda cfg: ["shards"],
          lambda cfg: {"sweep results": cfg.tune.output_dir / "results.md",
                       "best config": cfg.tune.output_dir / "best_config.yaml"},
          lambda cfg: [cfg.tune.output_dir / "best_config.yaml"], _run_tune),
    Stage("train", _training, _run_dir, ("seed", "diffusion", "train"), lambda cfg: ["shards"],
          _last_checkpoint, lambda cfg: [_last_checkpoint(cfg)["final checkpoint"] / "ema.safetensors"], _run_train),
    Stage("evaluate", lambda cfg: _training(cfg) or (None if cfg.pipeline.evaluate else "pipeline.evaluate is false"),
          _run_dir, ("evaluate", "data.curate.clip.model"), lambda cfg: ["train"],
          lambda cfg: {"report": _run_dir(cfg) / "report.md", "model card": _run_dir(cfg) / "model_card.md",
                       "dataset card": _data(cfg) / "dataset_card.md"},
          lambda cfg: [_run_dir(cfg) / "report.md"], _run_evaluate),
    Stage("export", lambda cfg: _training(cfg) or (None if cfg.pipeline.export else "pipeline.export is false"),
          _run_dir, ("export",), lambda cfg: ["train"],
          lambda cfg: {"export": _run_dir(cfg) / "export", "export report": _run_dir(cfg) / "export" / "export_report.md"},
          lambda cfg: [_run_dir(cfg) / "export" / "export_report.json"], _run_export),
]
STAGES_BY_NAME = {s.name: s for s in STAGES}


# ---------------------------------------------------------------------------- fingerprints
def _value_at(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _source_inputs(cfg: Config) -> list:
    """What each source's files look like now: names, sizes and modification times of a folder's
    or tar folder's files, the bytes' hash of a table (whose rows name the images). A demo source
    is its config."""
    listing = []
    for src in cfg.data.sources:
        if src.kind == "table":
            listing.append([src.name, _file_hash([src.path])])
        elif src.kind in ("folder", "webdataset"):
            files = [src.path] if src.path.is_file() else sorted(p for p in src.path.rglob("*") if p.is_file())
            listing.append([src.name, [[str(p.relative_to(src.path.parent)), p.stat().st_size, p.stat().st_mtime_ns]
                                       for p in files]])
    return listing


def _file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _record_path(stage: Stage, cfg: Config) -> Path:
    return stage.folder(cfg) / RECORDS / f"{stage.name}.json"


def read_record(stage: Stage, cfg: Config) -> dict | None:
    path = _record_path(stage, cfg)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # never written whole (records are replaced atomically): ignore
        log.warning("%s is not readable JSON; the stage will run again", path)
        return None


def _write_record(stage: Stage, cfg: Config, record: dict) -> None:
    path = _record_path(stage, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def fingerprint(stage: Stage, cfg: Config, outputs: dict[str, str]) -> str:
    """The stage's config keys, its upstream stages' output hashes, and (ingest) its sources."""
    tree = to_dict(cfg)
    parts = {"stage": stage.name, "config": {key: _value_at(tree, key) for key in stage.keys},
             "reads": {name: outputs[name] for name in stage.reads(cfg)}}
    if stage.name == "ingest":
        parts["sources"] = _source_inputs(cfg)
    return content_hash(parts)


# --------------------------------------------------------------------------------- the job
def _check_run_folder(cfg: Config, record: dict | None) -> None:
    """Training continues a run folder only if the run in it is this config's on this data."""
    from sfumato.train import checkpoint as ckpt

    run = _run_dir(cfg)
    latest = ckpt.latest(run / "checkpoints")
    if latest is None:
        return
    if record is None:
        raise ConfigError(f"train.output_dir={run} already holds a training run ({latest.name}) that this pipeline "
                          "did not start: set train.output_dir to a new folder, or delete that one to train again")
    raise ConfigError(f"train.output_dir={run} holds a run of another config or other data (its fingerprint "
                      f"{record['fingerprint']} was recorded in {_record_path(STAGES_BY_NAME['train'], cfg)}): "
                      "set train.output_dir to a new folder, or delete that one to train again")


def run_pipeline(cfg: Config, print_fn: Callable[[str], None] = print) -> dict:
    """Run (or continue) every enabled stage; returns the summary, also written as
    pipeline_summary.{json,md} into the run folder (the data folder for a data-only config)."""
    from sfumato.runtime import init_ray

    import ray

    started = time.perf_counter()
    # A local Ray this job starts is shut down before the summary, so that the workers' last log
    # lines come before it. Not a cluster's: under `ray job submit` that would drop the job's
    # working directory, this process's current directory, while it still runs.
    ours = not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    # With a trainer: the dashboard too, whose state API Ray Train uses to free the workers of a
    # stopped trainer (a tune trial stopped early) and to watch its controller.
    init_ray(cfg.ray, dashboard=cfg.train is not None)
    outputs: dict[str, str] = {}  # stage -> content hash of what it wrote
    outcomes: list[Outcome] = []
    total = len(STAGES)
    for number, stage in enumerate(STAGES, 1):
        tag = f"[pipeline {number}/{total}] {stage.name}"
        off = stage.enabled(cfg)
        if off:
            outcomes.append(Outcome(stage.name, "off", off))
            print_fn(f"{tag}: off ({off})")
            continue
        fp = fingerprint(stage, cfg, outputs)
        record = read_record(stage, cfg)
        artifacts = stage.artifacts(cfg)
        if record and record.get("state") == "done" and record["fingerprint"] == fp and \
                all(p.exists() for p in artifacts.values()):
            outputs[stage.name] = record["output_hash"]
            outcomes.append(Outcome(stage.name, "skipped", f"complete for this config ({_record_path(stage, cfg)})",
                                    record.get("seconds", 0.0), {k: str(v) for k, v in artifacts.items()},
                                    record.get("result", {})))
            print_fn(f"{tag}: skipped, complete for this config and inputs (fingerprint {fp})")
            if stage.name == "tune":
                cfg = _tuned(cfg, print_fn)
            elif stage.name == "train":
                write_resolved(cfg, _run_dir(cfg) / "config.yaml")  # evaluate and export read theirs from it
            continue
        if stage.name == "train" and not (record and record["fingerprint"] == fp):
            _check_run_folder(cfg, record)
        resumed = " (again: an earlier attempt did not finish)" if record and record["fingerprint"] == fp else ""
        print_fn(f"{tag}: running{resumed}, fingerprint {fp}")
        _write_record(stage, cfg, {"stage": stage.name, "state": "running", "fingerprint": fp, "started": time.time()})
        t0 = time.perf_counter()
        line, result = stage.run(cfg)
        seconds = round(time.perf_counter() - t0, 1)
        output_hash = _file_hash(stage.produced(cfg))
        outputs[stage.name] = output_hash
        artifacts = stage.artifacts(cfg)  # names that depend on what the stage wrote (the last grid)
        _write_record(stage, cfg, {"stage": stage.name, "state": "done", "fingerprint": fp, "output_hash": output_hash,
                                   "finished": time.time(), "seconds": seconds,
                                   "artifacts": {k: str(v) for k, v in artifacts.items()}, "result": result})
        outcomes.append(Outcome(stage.name, "ran", line, seconds, {k: str(v) for k, v in artifacts.items()}, result))
        print_fn(f"{tag}: done in {seconds:.0f} s. {line}")
        if stage.name == "tune":
            cfg = _tuned(cfg, print_fn)
    if ours:
        ray.shutdown()
    summary = _summary(cfg, outcomes, time.perf_counter() - started)
    for text in _summary_lines(summary):
        print_fn(text)
    return summary


def _tuned(cfg: Config, print_fn) -> Config:
    """The full run with the sweep's best values (best_config.yaml) for the stages after tune; the
    pipeline's evaluate and export settings stay."""
    best = cfg.tune.output_dir / "best_config.yaml"
    tuned = load_config(best, inputs=False)
    print_fn(f"[pipeline] training the sweep's best config: {best}")
    return tuned.model_copy(update={"evaluate": cfg.evaluate, "export": cfg.export, "ray": cfg.ray,
                                    "pipeline": cfg.pipeline.model_copy(update={"tune": False})})


def serve_command(cfg: Config) -> str | None:
    if cfg.train is None or not cfg.pipeline.export:
        return None
    return f"sfumato serve --model {_shown(_run_dir(cfg) / 'export')}"


def _shown(path: Path | str) -> str:
    """Paths under the working directory relative to it (as a user typed them), others whole."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _summary(cfg: Config, outcomes: list[Outcome], seconds: float) -> dict:
    folder = _run_dir(cfg) if cfg.train is not None else _data(cfg)
    summary = {
        "name": cfg.name, "seconds": round(seconds, 1), "summary": str(folder / f"{SUMMARY}.md"),
        "stages": [o.__dict__ for o in outcomes], "serve": serve_command(cfg),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(summary, indent=1, default=str)),
                         (".md", "\n".join(_summary_lines(summary, markdown=True)) + "\n")):
        tmp = folder / f"{SUMMARY}{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / f"{SUMMARY}{suffix}")
    return summary


def _summary_lines(summary: dict, markdown: bool = False) -> list[str]:
    ran = sum(s["status"] == "ran" for s in summary["stages"])
    skipped = sum(s["status"] == "skipped" for s in summary["stages"])
    lines = [f"# Pipeline {summary['name']}" if markdown else f"[pipeline] {summary['name']}: done",
             "", f"{ran} stages ran, {skipped} were already complete, in {summary['seconds']:.0f} s.", "",
             "| stage | status | seconds | note |", "| --- | --- | ---: | --- |"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |" for s in summary["stages"]]
    lines += ["", "Artifacts:", ""]
    for s in summary["stages"]:
        lines += [f"- {s['stage']}: {label}: `{_shown(path)}`" for label, path in s["artifacts"].items()]
    if summary["serve"]:
        lines += ["", "Serve the exported model over HTTP (POST /v1/generate):", "", f"    {summary['serve']}"]
    lines += ["", f"This summary: {_shown(summary['summary'])} (and .json)."]
    return lines

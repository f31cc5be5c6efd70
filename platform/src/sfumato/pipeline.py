"""`sfumato pipeline --config FILE`: the whole job on one config, data in, an exported model out.

    ingest -> safety -> dedup -> caption -> shards -> cache -> tune -> train -> evaluate -> export

The stages, with the config keys each reads, are sfumato.stages.REGISTRY (the CLI dispatches
from it too); this module runs them in order and decides which are already complete.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sfumato import checkpoint as ckpt
from sfumato.config import Config, ConfigError, content_hash, load_config, to_dict, write_resolved
from sfumato.layout import PIPELINE_RECORDS, DataFolder, RunFolder, TuneFolder, atomic_write, atomic_write_json
from sfumato.stages import REGISTRY, Stage, StageResult, pipeline_stages

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one stage did in this run of the pipeline."""

    stage: str
    status: str  # ran | skipped | off
    note: str = ""  # what it did, or why it was off or skipped
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    result: dict = field(default_factory=dict)  # the stage's StageResult.values


@dataclass(frozen=True)
class StageRecord:
    """`<stage folder>/pipeline/<stage>.json`: written when a stage starts (state running) and
    when it finishes (state done, with what it wrote); what a later run compares to skip it."""

    stage: str
    state: str  # running | done
    fingerprint: str
    started: float | None = None
    finished: float | None = None
    seconds: float = 0.0
    output_hash: str | None = None
    """The content hash of the stage's produced files (what later stages' fingerprints see)."""
    artifacts: dict[str, str] = field(default_factory=dict)
    result: dict = field(default_factory=dict)  # the stage's StageResult.values

    @classmethod
    def from_json(cls, tree: dict) -> StageRecord:
        return cls(**{f.name: tree[f.name] for f in fields(cls) if f.name in tree})

    def done(self) -> bool:
        return self.state == "done"


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
            listing.append(
                [
                    src.name,
                    [[str(p.relative_to(src.path.parent)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
                ]
            )
    return listing


def _file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _record_path(stage: Stage, cfg: Config) -> Path:
    return stage.folder(cfg) / PIPELINE_RECORDS / f"{stage.name}.json"


def read_record(stage: Stage, cfg: Config) -> StageRecord | None:
    path = _record_path(stage, cfg)
    try:
        return StageRecord.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError):  # never written whole (records are replaced atomically): ignore
        log.warning("%s is not a readable stage record; the stage will run again", path)
        return None


def _write_record(stage: Stage, cfg: Config, record: StageRecord) -> None:
    atomic_write_json(_record_path(stage, cfg), asdict(record))


def fingerprint(stage: Stage, cfg: Config, outputs: dict[str, str]) -> str:
    """The stage's config keys, its upstream stages' output hashes, and (ingest) its sources."""
    tree = to_dict(cfg)
    parts = {
        "stage": stage.name,
        "config": {key: _value_at(tree, key) for key in stage.keys},
        "reads": {name: outputs[name] for name in stage.reads(cfg)},
    }
    if stage.name == "ingest":
        parts["sources"] = _source_inputs(cfg)
    return content_hash(parts)


# --------------------------------------------------------------------------------- the job
def _check_run_folder(cfg: Config, record: StageRecord | None) -> None:
    """Training continues a run folder only if the run in it is this config's on this data."""
    run = cfg.train.output_dir
    latest = ckpt.latest(RunFolder(run).checkpoints)
    if latest is None:
        return
    if record is None:
        raise ConfigError(
            f"train.output_dir={run} already holds a training run ({latest.name}) that this pipeline "
            "did not start: set train.output_dir to a new folder, or delete that one to train again"
        )
    raise ConfigError(
        f"train.output_dir={run} holds a run of another config or other data (its fingerprint "
        f"{record.fingerprint} was recorded in {_record_path(REGISTRY['train'], cfg)}): "
        "set train.output_dir to a new folder, or delete that one to train again"
    )


def run_pipeline(cfg: Config, print_fn: Callable[[str], None] = print) -> dict:
    """Run (or continue) every enabled stage; returns the summary, also written as
    pipeline_summary.{json,md} into the run folder (the data folder for a data-only config)."""
    import ray

    from sfumato.runtime import init_ray

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
    stages = pipeline_stages()
    for number, stage in enumerate(stages, 1):
        tag = f"[pipeline {number}/{len(stages)}] {stage.name}"
        off = stage.enabled(cfg)
        if off:
            outcomes.append(Outcome(stage.name, "off", off))
            print_fn(f"{tag}: off ({off})")
            continue
        fp = fingerprint(stage, cfg, outputs)
        record = read_record(stage, cfg)
        artifacts = stage.artifacts(cfg)
        if record and record.done() and record.fingerprint == fp and all(p.exists() for p in artifacts.values()):
            outputs[stage.name] = record.output_hash
            outcomes.append(
                Outcome(
                    stage.name,
                    "skipped",
                    f"complete for this config ({_record_path(stage, cfg)})",
                    record.seconds,
                    {k: str(v) for k, v in artifacts.items()},
                    record.result,
                )
            )
            print_fn(f"{tag}: skipped, complete for this config and inputs (fingerprint {fp})")
            if stage.name == "tune":
                cfg = _tuned(cfg, print_fn)
            elif stage.name == "train":
                write_resolved(cfg, RunFolder(cfg.train.output_dir).config)  # evaluate and export read theirs from it
            continue
        same_config = record is not None and record.fingerprint == fp
        if stage.name == "train" and not same_config:
            _check_run_folder(cfg, record)
        resumed = " (again: an earlier attempt did not finish)" if same_config else ""
        print_fn(f"{tag}: running{resumed}, fingerprint {fp}")
        running = StageRecord(stage.name, "running", fp, started=time.time())
        _write_record(stage, cfg, running)
        t0 = time.perf_counter()
        result: StageResult = stage.run(cfg)
        seconds = round(time.perf_counter() - t0, 1)
        output_hash = _file_hash(stage.produced(cfg))
        outputs[stage.name] = output_hash
        # Names that depend on what the stage wrote (the last grid).
        artifacts = {k: str(v) for k, v in stage.artifacts(cfg).items()}
        _write_record(
            stage,
            cfg,
            StageRecord(
                stage.name, "done", fp, running.started, time.time(), seconds, output_hash, artifacts, result.values
            ),
        )
        outcomes.append(Outcome(stage.name, "ran", result.line, seconds, artifacts, result.values))
        print_fn(f"{tag}: done in {seconds:.0f} s. {result.line}")
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
    best = TuneFolder(cfg.tune.output_dir).best_config
    tuned = load_config(best, inputs=False)
    print_fn(f"[pipeline] training the sweep's best config: {best}")
    return tuned.model_copy(
        update={
            "evaluate": cfg.evaluate,
            "export": cfg.export,
            "ray": cfg.ray,
            "pipeline": cfg.pipeline.model_copy(update={"tune": False}),
        }
    )


def serve_command(cfg: Config) -> str | None:
    if cfg.train is None or not cfg.pipeline.export:
        return None
    return f"sfumato serve --model {_shown(RunFolder(cfg.train.output_dir).export)}"


def _shown(path: Path | str) -> str:
    """Paths under the working directory relative to it (as a user typed them), others whole."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _summary(cfg: Config, outcomes: list[Outcome], seconds: float) -> dict:
    folder = RunFolder(cfg.train.output_dir) if cfg.train is not None else DataFolder(cfg.data.output_dir)
    path = folder.pipeline_summary
    summary = {
        "name": cfg.name,
        "seconds": round(seconds, 1),
        "summary": str(path),
        "stages": [o.__dict__ for o in outcomes],
        "serve": serve_command(cfg),
    }
    atomic_write_json(path.with_suffix(".json"), summary)
    atomic_write(path, "\n".join(_summary_lines(summary, markdown=True)) + "\n")
    return summary


def _summary_lines(summary: dict, markdown: bool = False) -> list[str]:
    ran = sum(s["status"] == "ran" for s in summary["stages"])
    skipped = sum(s["status"] == "skipped" for s in summary["stages"])
    lines = [
        f"# Pipeline {summary['name']}" if markdown else f"[pipeline] {summary['name']}: done",
        "",
        f"{ran} stages ran, {skipped} were already complete, in {summary['seconds']:.0f} s.",
        "",
        "| stage | status | seconds | note |",
        "| --- | --- | ---: | --- |",
    ]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |" for s in summary["stages"]]
    lines += ["", "Artifacts:", ""]
    for s in summary["stages"]:
        lines += [f"- {s['stage']}: {label}: `{_shown(path)}`" for label, path in s["artifacts"].items()]
    if summary["serve"]:
        lines += ["", "Serve the exported model over HTTP (POST /v1/generate):", "", f"    {summary['serve']}"]
    lines += ["", f"This summary: {_shown(summary['summary'])} (and .json)."]
    return lines

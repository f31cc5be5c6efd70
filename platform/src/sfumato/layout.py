"""The on-disk formats: every file and folder a stage reads or writes in a run folder or a data
folder is named here, once, and written through the one atomic writer below.

    DATA_DIR/ (data.output_dir)             RUN_DIR/ (train.output_dir)
      manifest.parquet, rejects.parquet       config.yaml       the resolved config
      ingest_summary.json                     classes.json      class index -> name it trained with
      dedup_report.json, embeddings/          metrics.jsonl     one line per logged step, and per rollback
      shards/<res>/*.tar (+ .json sidecars)   attempts.jsonl    one line per start (and rollback)
      shards/shard_manifest.csv               STOPPED.json      a stop: NaN/Inf, spike
      shards/classes.json, class_counts.json  checkpoints/step-NNNNNNNN/ (sfumato.checkpoint)
      shards/class_weights.json               samples/step-NNNNNNNN.png
      cache/<key>/<res>/*.safetensors (+ .json)
      dataset_card.md (+ .json, plots)        evaluation/metrics.jsonl
      domain_classifier/<fingerprint>/        report.md, report/, model_card.md
      segmenter/<fingerprint>/ (scenes' judge)
      pipeline/<stage>.json                   export/, text/ (tokenizer, sample prompts)
                                              pipeline/<stage>.json, pipeline_summary.md|json
    TUNE_DIR/ (tune.output_dir)
      sweep.config.yaml, experiment/ (Ray Tune), trials/<id>/ (run folders + params.json)
      results.csv, results.md, curves.png, best_config.yaml, best.json

Writers replace a file whole (a temporary file in the same folder, fsync, `os.replace`), so a
reader never sees half of one; jsonl files are appended a line at a time and their reader skips a
cut-off last line. This module imports only the standard library: config, data, train, evaluate
and export all stand on it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path


# ------------------------------------------------------------------------------------ writing
def atomic_write(path: Path, data: bytes | str) -> Path:
    """Replace `path` whole with `data` (text is UTF-8): a crash leaves the old file or the new
    one, never a mix. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: Path, data, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(data, indent=indent, default=str))


def temporary_sibling(path: Path) -> Path:
    """A temporary name beside `path` for writers that produce the file themselves (a parquet
    writer, a tar): write there, then `commit_file` it into place."""
    return Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}-{threading.get_ident()}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a `temporary_sibling` (left behind when a writer was killed)."""
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp"))  # and the older `.x.tmp`


def commit_file(tmp: Path, path: Path) -> Path:
    """fsync `tmp` and rename it onto `path` (the second half of an atomic write)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return Path(path)


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line, flushed: a crash can cut off at most this line (which `read_jsonl` skips)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; [] when the file is absent. A cut-off last line (a crash
    mid-write) is skipped; a bad line anywhere else is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON: {err}") from None
    return records


def by_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written: steps a resumed attempt logged again replace the
    earlier attempt's lines."""
    latest = {record["step"]: record for record in records}
    return [latest[step] for step in sorted(latest)]


def read_metrics(path: Path) -> list[dict]:
    """A metrics.jsonl's logged steps as one record per step, in step order (`by_step`); its
    event lines (`metric_events`) are left out."""
    return by_step([r for r in read_jsonl(path) if "event" not in r])


def metric_events(path: Path, event: str) -> list[dict]:
    """A metrics.jsonl's event lines of one kind, in the order written: {"event": "rollback",
    "step": the step training went back to, ...} (sfumato.train.checkpointing.roll_back)."""
    return [r for r in read_jsonl(path) if r.get("event") == event]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of steps after `last_step` (what an attempt logged past the checkpoint it
    died after): the resumed attempt logs those steps again, once."""
    path = Path(path)
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) != len(records) or (path.is_file() and not path.read_text().endswith("\n")):
        atomic_write(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))


def read_json(path: Path, default=None):
    """A JSON file's content, or `default` when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


# ------------------------------------------------------------------------------ the folders
@dataclass(frozen=True)
class _Folder:
    """A folder of a known layout; its properties name the files in it."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def relative(self, path: Path) -> str:
        """`path` relative to this folder, with forward slashes: how its own files (a shard
        manifest, a report's links) name what is inside it."""
        return Path(path).relative_to(self.root).as_posix()


PIPELINE_RECORDS = "pipeline"  # in both folders: <stage>.json, one per finished pipeline stage
PIPELINE_SUMMARY = "pipeline_summary.md"  # and .json beside it
EXPORT_META = "sfumato_export.json"  # inside an export's diffusers folder


class ShardFolder(_Folder):
    """DATA_DIR/shards: WebDataset tars per resolution and what describes them."""

    manifest = property(lambda self: self.root / "shard_manifest.csv")  # shard, resolution_px, count, bytes, sha256
    classes = property(lambda self: self.root / "classes.json")  # tag -> class index
    class_counts = property(lambda self: self.root / "class_counts.json")
    class_weights = property(lambda self: self.root / "class_weights.json")  # train.class_balanced's draw
    config = property(lambda self: self.root / "shards.config.yaml")

    def resolution(self, resolution_px: int) -> Path:
        """The folder of one resolution's tars (shard-NNNNNN.tar, each with a .json sidecar)."""
        return self.root / str(resolution_px)

    def shard(self, resolution_px: int, index: int) -> Path:
        return self.resolution(resolution_px) / f"shard-{index:06d}.tar"

    @staticmethod
    def sidecar(shard: Path) -> Path:
        """A tar's completion marker: its sample count, hash and per-source counts (JSON)."""
        return shard.with_suffix(".json")


class CacheFolder(_Folder):
    """DATA_DIR/cache/<key>: one latent cache (sfumato.models.cache), named by the hash of what
    its values depend on apart from the shards (the VAE's identity and weights, the stored dtype);
    each file also records the sha256 of the shard it was encoded from."""

    meta = property(lambda self: self.root / "cache.json")  # the key's parts, bytes per sample, counts

    def resolution(self, resolution_px: int) -> Path:
        return self.root / str(resolution_px)

    def shard(self, resolution_px: int, index: int) -> Path:
        """The posterior mean and std of shard-NNNNNN.tar's samples, in its order (safetensors)."""
        return self.resolution(resolution_px) / f"shard-{index:06d}.safetensors"

    @staticmethod
    def sidecar(cache_file: Path) -> Path:
        """A cache file's completion marker (written last): shard hash, key, ids, bytes (JSON)."""
        return cache_file.with_suffix(".json")


class DataFolder(_Folder):
    """data.output_dir: what the data stages write and training reads."""

    manifest = property(lambda self: self.root / "manifest.parquet")
    rejects = property(lambda self: self.root / "rejects.parquet")
    ingest_summary = property(lambda self: self.root / "ingest_summary.json")
    dedup_report = property(lambda self: self.root / "dedup_report.json")
    dedup_review = property(lambda self: self.root / "dedup_review.png")  # borderline clusters, for a person
    embeddings = property(lambda self: self.root / "embeddings")
    embeddings_meta = property(lambda self: self.embeddings / "meta.json")  # model, manifest fingerprint, dim

    def embedding_parts(self, kind: str) -> Path:
        """embeddings/<kind>/part-NNNNN.parquet (kind: image or text)."""
        return self.embeddings / kind

    shards = property(lambda self: self.root / "shards")
    shard_folder = property(lambda self: ShardFolder(self.shards))
    cache = property(lambda self: self.root / "cache")  # cache/<key>/: CacheFolder, one per VAE

    def cache_folder(self, key: str) -> CacheFolder:
        return CacheFolder(self.cache / key)

    def cache_folders(self) -> list[CacheFolder]:
        """Every complete latent cache here (one per VAE the shards were encoded with)."""
        return [CacheFolder(p) for p in sorted(self.cache.glob("*")) if CacheFolder(p).meta.is_file()]

    dataset_card = property(lambda self: self.root / "dataset_card.md")
    domain_classifier = property(lambda self: self.root / "domain_classifier")
    segmenter = property(lambda self: self.root / "segmenter")  # the compositional yardstick's judge
    fid_cache = property(lambda self: self.root / "fid_cache")
    ingest_config = property(lambda self: self.root / "ingest.config.yaml")  # data.* as ingest ran it
    blobs = property(lambda self: self.root / "blobs")  # content-addressed bytes of URLs and tar members
    demo = property(lambda self: self.root / "demo")  # demo/<source name>/: the drawn shapes
    pipeline_summary = property(lambda self: self.root / PIPELINE_SUMMARY)  # of a data-only pipeline


class RunFolder(_Folder):
    """train.output_dir: one training run, from its resolved config to its export."""

    config = property(lambda self: self.root / "config.yaml")
    classes = property(lambda self: self.root / "classes.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    attempts = property(lambda self: self.root / "attempts.jsonl")
    stopped = property(lambda self: self.root / "STOPPED.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    samples = property(lambda self: self.root / "samples")
    evaluation = property(lambda self: self.root / "evaluation")
    evaluations = property(lambda self: self.evaluation / "metrics.jsonl")
    report = property(lambda self: self.root / "report.md")
    report_plots = property(lambda self: self.root / "report")
    model_card = property(lambda self: self.root / "model_card.md")
    export = property(lambda self: self.root / "export")  # an ExportFolder
    text = property(lambda self: self.root / "text")
    sample_prompts = property(lambda self: self.text / "sample_prompts.json")
    tokenizer = property(lambda self: self.text / "tokenizer")  # trained on the captions, or the pretrained one's
    ray_storage = property(lambda self: self.root / "ray")
    pipeline_summary = property(lambda self: self.root / PIPELINE_SUMMARY)
    injected_failure = property(lambda self: self.root / ".injected")
    selected_ids = property(lambda self: self.root / "selected_ids.txt")  # a fine-tune's data (train/finetune)

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:08d}.png"

    def sample_grids(self) -> list[tuple[int, Path]]:
        """(step, path) of every grid written, by step."""
        found = [(int(p.stem[5:]), p) for p in self.samples.glob("step-*.png") if p.stem[5:].isdigit()]
        return sorted(found)

    def require(self) -> RunFolder:
        """This folder, or an error saying it is not a run folder (no config.yaml)."""
        if not self.config.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a run folder: it has no config.yaml "
                "(a run folder is the train.output_dir that `sfumato train` writes)"
            )
        return self


class ExportFolder(_Folder):
    """RUN_DIR/export (or `sfumato export --out`): what serving and users load."""

    diffusers = property(lambda self: self.root / "diffusers")  # DiffusionPipeline.from_pretrained(...)
    diffusers_index = property(lambda self: self.diffusers / "model_index.json")
    meta = property(lambda self: self.diffusers / EXPORT_META)  # run, checkpoint, step, config hash
    onnx = property(lambda self: self.root / "onnx")  # denoiser(.int8).onnx, sampler.json, sample_onnx.py
    lora = property(lambda self: self.root / "lora")  # a LoRA run's adapter, diffusers' format (models/lora)
    report_md = property(lambda self: self.root / "export_report.md")
    report_json = property(lambda self: self.root / "export_report.json")


class TuneFolder(_Folder):
    """tune.output_dir: one sweep. Every trial is a run folder of its own under trials/."""

    sweep_config = property(lambda self: self.root / "sweep.config.yaml")  # the resolved config it started with
    experiment = property(lambda self: self.root / "experiment")  # Ray Tune's own state (for --resume)
    results_csv = property(lambda self: self.root / "results.csv")
    results_md = property(lambda self: self.root / "results.md")
    curves = property(lambda self: self.root / "learning_curves.png")
    best_config = property(lambda self: self.root / "best_config.yaml")
    best = property(lambda self: self.root / "best.json")

    def trial(self, trial_id: str) -> RunFolder:
        return RunFolder(self.root / "trials" / trial_id)

    @staticmethod
    def params(trial: RunFolder) -> Path:
        """A trial's sampled values (beside its run folder's files)."""
        return trial.root / "params.json"

"""The records a run writes and every other module reads back: one definition each (issue 33).

metrics.jsonl holds one JSON line per logged optimizer step (`MetricsLine`: its step, time and
world size, then the parts that step has) and event lines (`RollbackEvent`); evaluations.jsonl
holds one `QualityRecord` per evaluation. The parts of a metrics line, in the order written:

    TrainStepRecord            every logged step: loss, its running average, lr, timing, memory
    SourceSharesRecord         a weighted source mixture's realised shares (data.sources weights)
    AlignmentStepRecord        an alignment's batch: implicit reward accuracy and margin (DPO)
    ValidationRecord           the held-out images' loss, EMA weights (train.validation)
    AlignmentValidationRecord  the held-out pairs' DPO figures and the policy's distance

The JSON keys are the field names, flat in one object per line, exactly as the code before these
types wrote them, so old run folders read back alike. Writers build records; readers parse lines
with `MetricsLine.from_json` (or `read_metric_lines`) and ask for a part by its type; a name that
must travel as a string (Ray Tune's metric, a plot's column) is one of the constants below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

_OMIT_NONE = "omit_none"
_EVENT = "event"  # the key of an event line (sfumato.layout.read_metrics leaves those lines out)


def _optional():
    """A field left out of the JSON line when None (written only when it applies)."""
    return field(default=None, metadata={_OMIT_NONE: True})


class Record:
    """A flat JSON object whose keys are the dataclass's field names."""

    def to_json(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not (f.metadata.get(_OMIT_NONE) and getattr(self, f.name) is None)
        }

    @classmethod
    def from_json(cls, data: dict):
        """Missing keys read as None: lines of older runs lack some fields."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    @classmethod
    def found_in(cls, data: dict) -> bool:
        return any(f.name in data for f in fields(cls))


def _name(record_type: type, name: str) -> str:
    """A field's name as a string, checked against the record when this module is imported."""
    if name not in {f.name for f in fields(record_type)}:
        raise AttributeError(f"{record_type.__name__} has no field {name!r}")
    return name


# ------------------------------------------------------------------------ metrics.jsonl parts
@dataclass(frozen=True)
class TrainStepRecord(Record):
    """A logged optimizer step (train.log_every_steps, and the last)."""

    stage: int  # curriculum stage index
    resolution_px: int
    loss: float  # this rank's last micro-batch
    loss_ema: float | None  # its bias-corrected running average (sfumato.train.progress.LossAverage)
    lr: float
    grad_norm: float | None
    samples_per_s: float
    step_time_s: float  # seconds per optimizer step over the window since the last logged step
    elapsed_s: float
    eta_s: float | None
    effective_batch: int
    ema_beta: float
    ema_halflife_images: float
    memory_mb: float


@dataclass(frozen=True)
class SourceSharesRecord(Record):
    """With data.sources weights: this rank's realised share of each source in the stage so far."""

    source_shares: dict[str, float]


@dataclass(frozen=True)
class AlignmentStepRecord(Record):
    """An alignment's logged batch (sfumato.diffusion.dpo): the implicit reward's accuracy and margin."""

    reward_accuracy: float
    reward_margin: float


@dataclass(frozen=True)
class ValidationRecord(Record):
    """The validation loss of the EMA weights on the held-out images (sfumato.train.step.validate)."""

    val_loss: float


@dataclass(frozen=True)
class AlignmentValidationRecord(Record):
    """An alignment's validation, EMA weights: the held-out pairs' figures (absent when no pair is
    held out) and ||theta - theta_ref|| / ||theta_ref|| (sfumato.train.align.policy_distance)."""

    heldout_dpo_loss: float | None = _optional()
    heldout_reward_accuracy: float | None = _optional()
    heldout_reward_margin: float | None = _optional()
    policy_distance: float | None = None


@dataclass(frozen=True)
class QualityWatchRecord(Record):
    """The EMA weights' samples scored by the domain yardstick during training (train.quality,
    sfumato.train.quality): class accuracy (class-conditional runs) and FD-domain."""

    watch_class_accuracy: float | None
    watch_fd_domain: float
    watch_samples: int
    watch_s: float  # seconds the check took (sampling and scoring): its cost


PARTS = (
    TrainStepRecord,
    SourceSharesRecord,
    AlignmentStepRecord,
    ValidationRecord,
    AlignmentValidationRecord,
    QualityWatchRecord,
)


@dataclass(frozen=True)
class MetricsLine(Record):
    """One line of metrics.jsonl: a logged step, a validation, or both (time and world size are
    None in lines of runs older than them; step None only in an empty record)."""

    step: int | None
    time: float | None = None
    world_size: int | None = None
    parts: tuple[Record, ...] = ()

    def get(self, part_type: type):
        """This line's part of that type, or None."""
        return next((p for p in self.parts if isinstance(p, part_type)), None)

    def value(self, name: str):
        """The value of one of its parts' fields by name (a column of metrics.jsonl), or None."""
        return next((getattr(p, name) for p in self.parts if name in p.__dataclass_fields__), None)

    def to_json(self) -> dict:
        line = {"step": self.step, "time": self.time, "world_size": self.world_size}
        for part in self.parts:
            line.update(part.to_json())
        return line

    @classmethod
    def from_json(cls, data: dict) -> MetricsLine:
        return cls(
            data.get("step"),
            data.get("time"),
            data.get("world_size"),
            tuple(part.from_json(data) for part in PARTS if part.found_in(data)),
        )


@dataclass(frozen=True)
class RollbackEvent(Record):
    """A loss-spike rollback (train.spike_guard; sfumato.train.checkpointing.roll_back): `step` is
    the step training went back to."""

    EVENT: ClassVar[str] = "rollback"

    step: int
    time: float
    spike_step: int
    first_spike_step: int
    loss: float
    loss_average: float
    factor: float
    rollback: int  # its number in the run
    lr_scale: float

    def to_json(self) -> dict:
        return {_EVENT: self.EVENT, **super().to_json()}


def read_metric_lines(path: Path) -> list[MetricsLine]:
    """A metrics.jsonl's logged steps, one per step in step order (a step an attempt logged
    again counts once, its last line; sfumato.layout.read_metrics), event lines left out."""
    from sfumato.layout import read_metrics

    return [MetricsLine.from_json(line) for line in read_metrics(path)]


def read_timeline(path: Path) -> list[MetricsLine]:
    """Every line of a metrics.jsonl in the order written, a step logged again included; an event
    line as a line without parts (it has a step and a time)."""
    from sfumato.layout import read_jsonl

    return [
        MetricsLine(line.get("step"), line.get("time")) if _EVENT in line else MetricsLine.from_json(line)
        for line in read_jsonl(path)
    ]


def read_rollbacks(path: Path) -> list[RollbackEvent]:
    from sfumato.layout import metric_events

    return [RollbackEvent.from_json(line) for line in metric_events(path, RollbackEvent.EVENT)]


# ---------------------------------------------------------------------- evaluations.jsonl
@dataclass(frozen=True)
class CompositionalRecord(Record):
    """The compositional yardstick's figures of one evaluation (sfumato.evaluate.compositional):
    per split ("seen", "held_out"), {"overall", "tasks": {task: accuracy}, "images", "prompts"}
    for the generated images, for rendered images of the same prompts (`real`, the ceiling) and
    for Gaussian noise (`noise`), and for random training scenes unrelated to the prompt
    (`chance`: what a model that ignores its prompt scores; older records lack it)."""

    splits: dict[str, dict]
    real: dict[str, dict]
    noise: dict[str, dict]
    per_prompt: dict[str, list[dict]]  # split -> [{"task", "text", "correct", "images"}] in the grid's order
    prompts_per_task: int
    images_per_prompt: int
    seed: int
    held_out: list[str]  # the demo source's held-out combinations
    resolution_px: int
    grid: str | None = None  # the judged images (green border: right, red: wrong), under evaluation/
    segmenter: dict | None = None  # its fingerprint, settings and training time
    seconds: float | None = None  # generating and judging, the segmenter's training included
    chance: dict[str, dict] | None = None  # random training scenes scored against the prompts
    unguided: dict[str, dict] | None = _optional()  # the same prompts and noise at guidance 1 (evaluate.unguided)


@dataclass(frozen=True)
class QualityRecord(Record):
    """One evaluation of a checkpoint (sfumato.evaluate.evaluate.run_evaluate): the domain
    yardstick's figures (a dict of sfumato.evaluate.domain's), FD in a named feature space,
    CLIPScore, the compositional yardstick's figures, and what they were measured with."""

    time: float | None = None
    checkpoint: str | None = None
    step: int | None = None
    features: str | None = None
    metric: str | None = None  # FID or FD-CLIP: the name of `fd`
    fd: float | None = None
    domain: dict | None = None
    domain_unguided: dict | None = _optional()  # the same samples at guidance 1 (evaluate.unguided)
    clip_score: float | None = None
    clip_score_model: str | None = None
    captions: str | None = None
    num_samples: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_interval: list[float] | None = _optional()  # [lo, hi] noise levels guided; absent: every step
    seed: int | None = None
    resolution_px: int | None = None
    generation_s: float | None = None
    reference: dict | None = None  # {"count", "resolution_px", "shards"} of the reference statistics
    compositional: CompositionalRecord | None = _optional()  # text runs on the demo's scenes

    def to_json(self) -> dict:
        data = super().to_json()
        if self.compositional is not None:
            data["compositional"] = self.compositional.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> QualityRecord:
        part = data.get("compositional")
        return replace(
            super().from_json(data), compositional=None if part is None else CompositionalRecord.from_json(part)
        )


# ----------------------------------------------------- the names that travel as strings
LOSS = _name(TrainStepRecord, "loss")
LOSS_EMA = _name(TrainStepRecord, "loss_ema")
LR = _name(TrainStepRecord, "lr")
GRAD_NORM = _name(TrainStepRecord, "grad_norm")
SAMPLES_PER_S = _name(TrainStepRecord, "samples_per_s")
VAL_LOSS = _name(ValidationRecord, "val_loss")  # what Ray Tune ranks trials on (sfumato.tune.space.METRIC)
HELDOUT_REWARD_ACCURACY = _name(AlignmentValidationRecord, "heldout_reward_accuracy")  # an alignment's headline
WATCH_CLASS_ACCURACY = _name(QualityWatchRecord, "watch_class_accuracy")
WATCH_FD_DOMAIN = _name(QualityWatchRecord, "watch_fd_domain")

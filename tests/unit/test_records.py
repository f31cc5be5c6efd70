"""The metrics records (sfumato.records): lines written with the key names of the code before the
typed records read back and write out unchanged, key order included, and a report is written
from a run folder holding such lines."""

import json

from helpers import REPO
from sfumato.records import (
    LOSS_EMA,
    VAL_LOSS,
    AlignmentStepRecord,
    AlignmentValidationRecord,
    MetricsLine,
    QualityRecord,
    RollbackEvent,
    SourceSharesRecord,
    TrainStepRecord,
    ValidationRecord,
    read_metric_lines,
    read_rollbacks,
)

# Lines as the worker wrote them before sfumato.records existed (the first from configs/debug.yaml's
# run on CIFAR-10; the others with the fields a mixture, a validation and an alignment add).
TRAIN = {
    "step": 2,
    "time": 1796616655.2123902,
    "world_size": 2,
    "stage": 0,
    "resolution_px": 16,
    "loss": 0.0756606012582779,
    "loss_ema": 0.14868515515417735,
    "lr": 0.001,
    "grad_norm": 0.38640299439430237,
    "samples_per_s": 45.28617992873047,
    "step_time_s": 0.3533086699999899,
    "elapsed_s": 0.7066173399999798,
    "eta_s": 4.107690708000064,
    "effective_batch": 16,
    "ema_beta": 0.9780634734473393,
    "ema_halflife_images": 499.99999999999966,
    "memory_mb": 731.75,
}
MIXTURE = {**TRAIN, "step": 4, "time": 1796616656.0, "source_shares": {"photos": 0.8125, "synthetic": 0.1875}}
VALIDATED = {**TRAIN, "step": 6, "time": 1796616657.0, "grad_norm": None, "eta_s": None, "val_loss": 0.2015}
VALIDATION_ONLY = {"step": 5, "time": 1796616656.5, "world_size": 2, "val_loss": 0.2101}
ALIGNED = {
    **TRAIN,
    "step": 8,
    "time": 1796616658.0,
    "reward_accuracy": 0.75,
    "reward_margin": 0.031,
    "heldout_dpo_loss": 0.688,
    "heldout_reward_accuracy": 0.625,
    "heldout_reward_margin": 0.012,
    "policy_distance": 0.0021,
}
NO_HELDOUT_PAIRS = {"step": 10, "time": 1796616659.0, "world_size": 2, "policy_distance": 0.0031}
ROLLBACK = {
    "event": "rollback",
    "step": 4,
    "time": 1796616660.0,
    "spike_step": 8,
    "first_spike_step": 6,
    "loss": 2.5,
    "loss_average": 0.15,
    "factor": 3.0,
    "rollback": 1,
    "lr_scale": 0.5,
}


def test_lines_of_the_old_key_names_round_trip_unchanged_key_order_included():
    for line in (TRAIN, MIXTURE, VALIDATED, VALIDATION_ONLY, ALIGNED, NO_HELDOUT_PAIRS):
        parsed = MetricsLine.from_json(line)
        assert json.dumps(parsed.to_json()) == json.dumps(line)
    aligned = MetricsLine.from_json(ALIGNED)
    assert [type(p) for p in aligned.parts] == [TrainStepRecord, AlignmentStepRecord, AlignmentValidationRecord]
    assert aligned.get(AlignmentStepRecord).reward_accuracy == 0.75 and aligned.get(ValidationRecord) is None
    assert MetricsLine.from_json(MIXTURE).get(SourceSharesRecord).source_shares["synthetic"] == 0.1875
    assert MetricsLine.from_json(VALIDATED).value(VAL_LOSS) == 0.2015
    assert MetricsLine.from_json(NO_HELDOUT_PAIRS).get(AlignmentValidationRecord).heldout_dpo_loss is None
    assert json.dumps(RollbackEvent.from_json(ROLLBACK).to_json()) == json.dumps(ROLLBACK)
    # A line of a run older than `time` and `world_size` still reads.
    old = MetricsLine.from_json({k: v for k, v in TRAIN.items() if k not in ("time", "world_size")})
    assert (old.step, old.time, old.world_size, old.value(LOSS_EMA)) == (2, None, None, TRAIN["loss_ema"])


def test_an_evaluation_record_reads_back_with_its_keys():
    record = {
        "time": 1.0,
        "checkpoint": "step-00000010",
        "step": 10,
        "features": None,
        "metric": None,
        "fd": None,
        "domain": {"class_accuracy": 0.5},
        "clip_score": None,
        "clip_score_model": None,
        "captions": None,
        "num_samples": 32,
        "sampler": "dpm++",
        "steps": 10,
        "guidance_scale": 2.0,
        "seed": 0,
        "resolution_px": 32,
        "generation_s": 1.5,
        "reference": None,
    }
    assert QualityRecord.from_json(record).to_json() == record
    limited = {**record, "guidance_interval": [0.2, 0.8]}  # written only when evaluate.guidance_interval is set
    assert QualityRecord.from_json(limited).to_json() == limited


def test_a_report_is_written_from_metrics_lines_of_the_old_key_names(tmp_path):
    from sfumato.config import load_config, write_resolved
    from sfumato.evaluate.report import training_compute, write_report
    from sfumato.layout import RunFolder

    run = RunFolder(tmp_path / "run")
    cfg = load_config(
        REPO / "configs" / "debug.yaml",
        [
            f"train.output_dir={run.root}",
            f"data.output_dir={tmp_path / 'data'}",
            "train.validation={holdout_fraction: 0.1, every_steps: 5}",
        ],
    )
    run.root.mkdir()
    write_resolved(cfg, run.config)
    lines = [TRAIN, MIXTURE, VALIDATION_ONLY, VALIDATED, ROLLBACK, {**MIXTURE, "time": 1796616661.0}]
    run.metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))

    steps = [line.step for line in read_metric_lines(run.metrics)]
    assert steps == [2, 4, 5, 6], "one line per step, the rollback event left out, the step logged again once"
    (rollback,) = read_rollbacks(run.metrics)
    assert (rollback.first_spike_step, rollback.lr_scale) == (6, 0.5)
    compute = training_compute(run.root)
    assert compute["method"] == "timestamps" and compute["world_size"] == 2 and compute["wall_s"] > 0
    report = write_report(run.root).read_text()
    assert "| final loss_ema | 0.1487 |" in report
    assert "| final val_loss | 0.2015 |" in report
    assert "| 1 | 8 | 6 | 2.5 | 0.15 | 3 | 4 | 0.5 |" in report
    for plot in ("loss.png", "val_loss.png", "lr.png", "grad_norm.png", "throughput.png"):
        assert (run.report_plots / plot).is_file(), plot

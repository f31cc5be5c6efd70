"""A run's report: runs/<name>/report.md plus its plots in runs/<name>/report/.

A person checking a run wants, on one page, what was trained (the resolved config), how it went
(loss, lr, gradient norm, throughput against step, with the curriculum's stage boundaries), what
the fixed-seed sample grids look like over time, what the evaluations measured, and what the
run cost in device-hours. Everything is read from the run folder; only config.yaml is required,
every other file is optional and its absence is said in the report, so a report can be written
for a run that has just started, crashed, or was never evaluated.

Plots use matplotlib's object API (`Figure` + the Agg canvas), so writing a report never
changes pyplot's global backend for the program that calls it.
"""

from __future__ import annotations

import bisect
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from sfumato.config import Config, load_run_config
from sfumato.documents import cell, format_duration, new_figure, table
from sfumato.layout import RunFolder, atomic_write, read_jsonl
from sfumato.records import (
    GRAD_NORM,
    LOSS,
    LOSS_EMA,
    LR,
    SAMPLES_PER_S,
    VAL_LOSS,
    WATCH_CLASS_ACCURACY,
    WATCH_FD_DOMAIN,
    AlignmentValidationRecord,
    MetricsLine,
    QualityRecord,
    TrainStepRecord,
    read_metric_lines,
    read_rollbacks,
    read_timeline,
)

SAMPLES_FIGURE = "samples_over_steps.png"
MAX_SAMPLES_IN_FIGURE = 6

# (file, title, y label, metrics.jsonl columns, log y)
CURVES = [
    ("loss.png", "Loss", "loss", [LOSS, LOSS_EMA], False),
    ("val_loss.png", "Validation loss (EMA weights, held-out images)", "val loss", [VAL_LOSS], False),
    ("watch_accuracy.png", "Class accuracy during training (EMA weights)", "accuracy", [WATCH_CLASS_ACCURACY], False),
    ("watch_fd.png", "FD-domain during training (EMA weights)", "FD-domain", [WATCH_FD_DOMAIN], True),
    ("lr.png", "Learning rate", "lr", [LR], False),
    ("grad_norm.png", "Gradient norm", "grad norm", [GRAD_NORM], True),
    ("throughput.png", "Throughput", "samples / s", [SAMPLES_PER_S], False),
]


# ------------------------------------------------------------------------------ reading a run
def read_evaluations(run_dir: Path) -> list[dict]:
    return read_jsonl(RunFolder(run_dir).evaluations)


# --------------------------------------------------------------------------------- compute
def training_compute(run_dir: Path) -> dict:
    """Wall time and device-hours of the run's training, from metrics.jsonl.

    Each log line closes a window of `train.log_every_steps` optimizer steps and records
    `step_time_s` = window seconds / log_every_steps, so a window lasted step_time_s x
    log_every_steps seconds. With `time` on the lines, an attempt (one start of the worker group,
    found from attempts.jsonl, else from the step going back) lasted from its first line's time
    minus that line's window to its last line's time; without `time`, the windows are summed.
    Either way idle gaps between a crash and the restart are not counted, and neither are each
    attempt's start-up (model build, checkpoint load) and the work after its last log line, so
    the figure slightly understates the cost. Device-hours = seconds x world size (the lines'
    `world_size`, else train.num_workers) / 3600, summed over attempts.
    """
    cfg = load_run_config(run_dir)
    metrics = read_timeline(RunFolder(run_dir).metrics)
    starts = [a["time"] for a in read_jsonl(RunFolder(run_dir).attempts) if "time" in a]
    timed = bool(metrics) and all(m.time is not None for m in metrics)
    window_steps = cfg.train.log_every_steps
    wall_s = device_s = 0.0
    segments = _attempt_segments(metrics, starts if timed else [])
    for segment in segments:
        seconds = _step_time_s(segment[0]) * window_steps
        if timed:
            seconds += segment[-1].time - segment[0].time
        else:
            seconds += sum(_step_time_s(m) * window_steps for m in segment[1:])
        wall_s += seconds
        device_s += seconds * (segment[-1].world_size or cfg.train.num_workers)
    elapsed_s = metrics[-1].time - min(starts) if timed and starts else None
    return {
        "wall_s": wall_s,
        "wall_hours": wall_s / 3600,
        "device_hours": device_s / 3600,
        "device": "GPU" if cfg.train.use_gpu else "CPU worker",
        "world_size": max([m.world_size or cfg.train.num_workers for m in metrics], default=cfg.train.num_workers),
        "attempts": len(segments),
        "elapsed_s": elapsed_s,
        "method": ("timestamps" if timed else "step_time_s") if metrics else "no metrics.jsonl lines",
    }


def _step_time_s(line: MetricsLine) -> float:
    """A logged step's seconds per step over its window; 0 for a line without one (an event)."""
    train = line.get(TrainStepRecord)
    return (train.step_time_s if train is not None else None) or 0.0


def _attempt_segments(metrics: list[MetricsLine], attempt_starts: list[float]) -> list[list[MetricsLine]]:
    """metrics.jsonl lines grouped by attempt: by the attempts' start times when given, else a
    new attempt wherever the step does not increase (a resume repeats steps)."""
    groups: dict[int, list[MetricsLine]] = {}
    starts = sorted(attempt_starts)
    attempt, previous_step = 0, None
    for line in metrics:
        if starts:
            attempt = bisect.bisect_right(starts, line.time)
        elif previous_step is not None and line.step <= previous_step:
            attempt += 1
        previous_step = line.step
        groups.setdefault(attempt, []).append(line)
    return [groups[k] for k in sorted(groups)]


def _guidance(e: QualityRecord) -> str | float | None:
    """The guidance an evaluation sampled with: its scale, and the noise levels it guided at when
    limited to an interval (evaluate.guidance_interval)."""
    if e.guidance_interval is None:
        return e.guidance_scale
    lo, hi = e.guidance_interval
    return f"{cell(e.guidance_scale)} at noise [{lo:g}, {hi:g}]"


def evaluation_lines(evaluations: list[dict]) -> list[str]:
    """The evaluations (evaluations.jsonl's lines) as tables: the domain yardstick's (when
    measured), then the Fréchet distances in pretrained feature spaces (when measured), with
    what each number can be compared with."""
    lines = domain_lines(evaluations) + compositional_lines(evaluations)
    records = [QualityRecord.from_json(e) for e in evaluations]
    fd = [e for e in records if e.fd is not None or e.clip_score is not None]
    if not fd:
        if not lines:
            lines = [
                "No metric was computed: the data has no classes for the domain yardstick, no feature "
                "network is configured (evaluate.inception_weights, evaluate.clip_model) and the run is not "
                "a text model on the demo's scenes (the compositional yardstick).",
                "",
            ]
        return lines + [
            "- No FID or CLIPScore: they need pretrained Inception or CLIP weights "
            "(evaluate.inception_weights, evaluate.clip_model), none configured.",
            "",
        ]
    header = [
        "checkpoint",
        "step",
        "metric",
        "features",
        "FD ↓",
        "CLIPScore ↑",
        "samples",
        "sampler (steps)",
        "guidance",
        "seed",
        "reference images",
    ]
    rows = [
        [
            e.checkpoint,
            e.step,
            e.metric,
            e.features,
            e.fd,
            e.clip_score,
            e.num_samples,
            f"{e.sampler} ({e.steps})",
            _guidance(e),
            e.seed,
            (e.reference or {}).get("count"),
        ]
        for e in fd
    ]
    features = sorted({f"{e.metric}: `{e.features}`" for e in fd})
    clip_models = sorted({e.clip_score_model for e in fd if e.clip_score is not None and e.clip_score_model})
    notes = [
        "FD is the Fréchet distance between generated and reference images in the named feature space "
        f"(lower is better). Features used: {'; '.join(features)}.",
        "FID (Inception-v3 features) and FD-CLIP (CLIP image features) are distances in different spaces: "
        "their numbers are not comparable with each other. FID is comparable with published FID only when "
        "computed with the standard Inception weights on the same reference set and sample count.",
    ]
    if clip_models:
        notes.append(f"CLIPScore measured with {', '.join(f'`{m}`' for m in clip_models)}.")
    return lines + table(header, rows) + [f"- {note}" for note in notes] + [""]


def domain_lines(evaluations: list[dict]) -> list[str]:
    """The domain yardstick's numbers per evaluation and the last one's confusion matrix."""
    measured = [e for e in (QualityRecord.from_json(e) for e in evaluations) if e.domain]
    if not measured:
        return []
    header = [
        "checkpoint",
        "step",
        "class accuracy ↑",
        "at guidance 1",
        "real (ceiling)",
        "noise (floor)",
        "FD-domain ↓",
        "at guidance 1",
        "real (floor)",
        "noise FD-domain",
        "coverage ↑ (real)",
        "samples",
        "sampler (steps)",
        "guidance",
        "seed",
    ]

    def coverage(d: dict):
        return None if d.get("coverage") is None else f"{cell(d['coverage'])} ({cell(d['coverage_real'])})"

    rows = [
        [
            e.checkpoint,
            e.step,
            e.domain["class_accuracy"],
            (e.domain_unguided or {}).get("class_accuracy"),
            e.domain["real_accuracy"],
            e.domain["noise_accuracy"],
            e.domain["fd_domain"],
            (e.domain_unguided or {}).get("fd_domain"),
            e.domain.get("fd_domain_floor"),
            e.domain["noise_fd_domain"],
            coverage(e.domain),
            e.num_samples,
            f"{e.sampler} ({e.steps})",
            _guidance(e),
            e.seed,
        ]
        for e in measured
    ]
    last = measured[-1].domain
    y = last.get("yardstick") or {}
    lines = ["### Domain yardstick (offline)", ""] + table(header, rows)
    lines += [
        f"- A classifier trained on this run's own training shards ({y.get('train_images')} images, "
        f"{y.get('resolution_px') or ''} px; fingerprint `{str(y.get('fingerprint'))[:16]}`) scores the generated "
        f"images: class accuracy is the share classified as the class they were asked for, against its "
        f"accuracy on {y.get('heldout_images')} held-out real images (the ceiling) and on Gaussian noise (the "
        "floor); FD-domain is the Fréchet distance to the held-out real images in its penultimate features "
        "(the FID formula), beside real training images' own at the same count (the floor: no model "
        "scores lower) and Gaussian noise's.",
        "- At guidance 1: the same noise and conditions drawn unguided (evaluate.unguided), so what "
        "guidance adds is visible. Coverage: the share of held-out real images whose nearest generated "
        "image is closer than their nearest image of a real training sample of the same size; a model "
        "drawing the whole data distribution scores about the real sample's own figure (in brackets, "
        "about 0.5), one drawing a few images per class near 0.",
        "- Comparable only with other runs on the same data and yardstick fingerprint: not with published "
        "FIDs, nor across datasets.",
        "",
    ]
    if last.get("confusion"):
        names = last["class_names"]
        lines += ["Confusion of the last evaluation (rows: asked, columns: classified as):", ""]
        lines += table(["asked"] + names, [[name] + row for name, row in zip(names, last["confusion"])])
    return lines


def compositional_lines(evaluations: list[dict]) -> list[str]:
    """The compositional yardstick's accuracies per evaluation and split: a row per task set, with
    the rendered images' (ceiling) and noise's (floor) beside the last evaluation's."""
    from sfumato.data.scenes import TASKS
    from sfumato.evaluate.compositional import SPLIT_NAMES

    measured = [e for e in (QualityRecord.from_json(e) for e in evaluations) if e.compositional]
    if not measured:
        return []
    header = ["checkpoint", "step", "split", "overall ↑", *TASKS, "images"]

    def row(label: list, figures: dict) -> list:
        tasks, overall = figures.get("tasks", {}), figures.get("overall")
        accuracies = [round(tasks[t], 3) if t in tasks else "–" for t in TASKS]
        return [*label, None if overall is None else round(overall, 3), *accuracies, figures.get("images")]

    rows = [
        row([e.checkpoint, e.step, SPLIT_NAMES.get(split, split)], figures)
        for e in measured
        for split, figures in e.compositional.splits.items()
    ]
    last = measured[-1].compositional
    for split, figures in (last.unguided or {}).items():
        rows.append(row([f"{measured[-1].checkpoint} at guidance 1", "", SPLIT_NAMES.get(split, split)], figures))
    for split in last.splits:
        rows.append(row(["rendered scenes (ceiling)", "", SPLIT_NAMES.get(split, split)], last.real.get(split, {})))
        if last.chance:
            rows.append(
                row(["random scenes, prompt ignored (chance)", "", SPLIT_NAMES.get(split, split)], last.chance[split])
            )
        rows.append(row(["Gaussian noise (floor)", "", SPLIT_NAMES.get(split, split)], last.noise.get(split, {})))
    segmenter = last.segmenter or {}
    held_out = ", ".join(f'"{h}"' for h in last.held_out) or "none"
    lines = ["### Compositional yardstick (offline, GenEval-style)", ""] + table(header, rows)
    return lines + [
        f"- Each of {last.prompts_per_task} prompts per task and split drawn {last.images_per_prompt} times "
        f"(seed {last.seed}) at {last.resolution_px} px and judged by a segmenter trained on rendered scenes "
        f"(fingerprint `{str(segmenter.get('fingerprint'))[:16]}`) with GenEval's rules; overall is the mean of "
        "the task accuracies. single_object, two_object, counting and position judge shapes only, colors and "
        "color_attr colours too.",
        f"- held-out: prompts that use a combination the training data never drew ({held_out}); seen: only "
        "combinations it drew. The gap between the two is what the model did not generalise.",
        "- Comparable across runs on the same prompts (prompts_per_task, seed, held-out list) and segmenter "
        "fingerprint; not with published GenEval scores (other objects, detector and prompts).",
        "",
    ]


def memorisation_lines(run_dir: Path, evaluations: list[dict]) -> list[str]:
    """The last evaluation's nearest-training-image figures and its closest pairs, side by side."""
    measured = [e for e in (QualityRecord.from_json(e) for e in evaluations) if (e.domain or {}).get("memorisation")]
    if not measured:
        return []
    m, folder = measured[-1].domain["memorisation"], RunFolder(run_dir)
    lines = [
        "### Memorisation",
        "",
        f"Each of the {measured[-1].num_samples} samples of {measured[-1].checkpoint} against its nearest training "
        "image (in the domain yardstick's features, then the closest in pixels among the "
        f"{m.get('candidates', 8)} nearest):",
        "",
    ]
    rows = [
        [
            "closer to a training image than real held-out images are",
            f"{m['closer_than_real']:.1%}",
            f"about {m['expected']:.0%} (the held-out images' own {m['expected']:.0%} quantile)",
        ],
        ["of them, also as close in pixels (copies)", f"{m['copies']:.1%}", "near 0%"],
        [
            "median feature distance to the nearest training image",
            cell(m["median_distance"]),
            f"{cell(m['heldout_median_distance'])} (held-out real images')",
        ],
    ]
    lines += table(["", "samples", "a model that draws new images"], rows)
    if m.get("pairs_grid"):
        lines += [
            "The closest pairs in pixels (left: the sample, right: its nearest training image; pixel RMSE "
            + ", ".join(f"{p['pixel_rmse']:.3f}" for p in m["closest_pairs"])
            + "):",
            "",
            f"![closest pairs]({folder.relative(folder.evaluation / m['pairs_grid'])})",
            "",
        ]
    return lines


def compositional_grid_lines(run_dir: Path, evaluations: list[dict]) -> list[str]:
    """The last compositional evaluation's judged images and its prompts in the grid's order."""
    from sfumato.evaluate.compositional import SPLIT_NAMES

    measured = [e for e in (QualityRecord.from_json(e) for e in evaluations) if e.compositional]
    if not measured or not measured[-1].compositional.grid:
        return []
    last, folder = measured[-1].compositional, RunFolder(run_dir)
    lines = [
        f"Judged images of {measured[-1].checkpoint} (a row per task and split, in the table's order, "
        f"{last.images_per_prompt} images per prompt; green border: right, red: wrong):",
        "",
        f"![compositional]({folder.relative(folder.evaluation / last.grid)})",
        "",
        "<details><summary>The prompts, row by row</summary>",
        "",
    ]
    rows = [
        [SPLIT_NAMES.get(split, split), p["task"], p["text"], f"{p['correct']}/{p['images']}"]
        for split, prompts in last.per_prompt.items()
        for p in prompts
    ]
    return lines + table(["split", "task", "prompt", "right"], rows) + ["</details>", ""]


# ------------------------------------------------------------------------------------ plots
def _series(lines: list[MetricsLine], column: str, positive: bool) -> tuple[list[int], list[float]]:
    values = [(line.step, line.value(column)) for line in lines]
    points = [
        (step, float(v))
        for step, v in values
        if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
    ]
    return [p[0] for p in points], [p[1] for p in points]


def stage_boundaries(cfg: Config) -> list[tuple[int, int]]:
    """(first step, resolution_px) of every curriculum stage after the first."""
    bounds, start = [], 0
    for stage in cfg.train.stages:
        if start:
            bounds.append((start, stage.resolution_px))
        start += stage.steps
    return bounds


def plot_curve(
    path: Path,
    records: list[MetricsLine],
    title: str,
    ylabel: str,
    columns: list[str],
    log_y: bool,
    boundaries: list[tuple[int, int]],
) -> bool:
    """One metric (or a raw/averaged pair) against step; False, and no file, without data."""
    series = {c: _series(records, c, positive=log_y) for c in columns}
    if not any(steps for steps, _ in series.values()):
        return False
    fig = new_figure()
    ax = fig.add_subplot()
    for number, (column, (steps, values)) in enumerate(series.items()):
        raw = len(columns) > 1 and number == 0  # the raw loss, faint under its average
        ax.plot(steps, values, label=column, linewidth=0.8 if raw else 1.5, alpha=0.45 if raw else 1.0)
    last_step = max(max(steps, default=0) for steps, _ in series.values())
    for step, resolution_px in boundaries:
        if step <= last_step:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.text(step, 0.98, f" {resolution_px} px", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    if len(columns) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def sample_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of samples/step-NNNNNNNN.png, by step."""
    found = RunFolder(run_dir).sample_grids()
    return sorted(found)


def evenly_spread(items: list, count: int) -> list:
    """Up to `count` items at evenly spaced positions, the first and the last included."""
    count = min(count, len(items))
    return [items[round(k * (len(items) - 1) / max(1, count - 1))] for k in range(count)]


def plot_samples_over_steps(path: Path, grids: list[tuple[int, Path]]) -> None:
    """Up to MAX_SAMPLES_IN_FIGURE grids side by side, evenly spread, first and last included."""
    import numpy as np
    from PIL import Image

    chosen = evenly_spread(grids, MAX_SAMPLES_IN_FIGURE)
    count = len(chosen)
    fig = new_figure(2.2 * count, 2.6)
    for k, (step, grid_path) in enumerate(chosen):
        ax = fig.add_subplot(1, count, k + 1)
        with Image.open(grid_path) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(f"step {step:,}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------- report
def _summary(cfg: Config, run_dir: Path, metrics: list[MetricsLine], compute: dict) -> list[str]:
    from sfumato import checkpoint as ckpt

    t = cfg.train
    attempts = [a for a in read_jsonl(RunFolder(run_dir).attempts) if "event" not in a]  # rollbacks: _rollbacks
    resumed = [a["resumed_from"] for a in attempts if a.get("resumed_from")]
    latest = ckpt.latest(RunFolder(run_dir).checkpoints)
    rows = [
        ["name", cfg.name],
        ["model", f"`{t.model}`" + (" (latent, VAE)" if t.vae else " (pixel space)")],
        ["conditioning", t.conditioning],
        ["resolution curriculum", " → ".join(f"{s.resolution_px} px × {s.steps:,} steps" for s in t.stages)],
        ["steps done / configured", f"{metrics[-1].step if metrics else 0:,} / {t.total_steps:,}"],
        [
            "effective batch",
            ", ".join(f"{cfg.train.effective_batch(s)} at {s.resolution_px} px" for s in t.stages)
            + f" (micro batch × {t.grad_accum_steps} accumulation × {t.num_workers} workers)",
        ],
        ["precision", t.precision],
        ["ZeRO stage", t.zero_stage],
        ["training wall time", format_duration(compute["wall_s"]) + f" ({compute['method']})"],
        [f"{compute['device']}-hours", f"{compute['device_hours']:.3g} ({compute['world_size']} × wall time)"],
        [
            "attempts",
            f"{len(attempts)} start(s), {max(0, len(attempts) - 1)} restart(s)"
            + (f", resumed from {', '.join(resumed)}" if resumed else ""),
        ],
        [f"final {LOSS_EMA}", _last(metrics, LOSS_EMA)],
        [f"final {VAL_LOSS}", _last(metrics, VAL_LOSS)],
        ["latest committed checkpoint", latest.name if latest else None],
    ]
    if compute["elapsed_s"] is not None:
        rows.insert(9, ["elapsed (first start to last log)", format_duration(compute["elapsed_s"])])
    stopped = RunFolder(run_dir).stopped
    if stopped.is_file():
        info = json.loads(stopped.read_text())
        rows.append(["STOPPED", f"at step {info.get('step')}: {info.get('error')}"])
    return ["## Summary", ""] + table(["", ""], rows)


def _rollbacks(run_dir: Path) -> list[str]:
    """The loss-spike guard's rollbacks (train.spike_guard), from metrics.jsonl's event lines."""
    events = read_rollbacks(RunFolder(run_dir).metrics)
    lines = ["## Rollbacks (loss spikes)", ""]
    if not events:
        return lines + ["None: no lasting loss spike (train.spike_guard).", ""]
    rows = [
        [e.rollback, e.spike_step, e.first_spike_step, e.loss, e.loss_average, e.factor, e.step, e.lr_scale]
        for e in events
    ]
    return (
        lines
        + table(
            [
                "rollback",
                "confirmed at step",
                "spike began at step",
                "loss",
                "running average before",
                "factor",
                "back to step",
                "lr scale after",
            ],
            rows,
        )
        + [
            "- Each rollback reloaded the newest committed checkpoint from before the spike and continued with the "
            "learning rate scaled by the lr scale; the steps after it were trained and logged again.",
            "",
        ]
    )


def _last(metrics: list[MetricsLine], column: str):
    return next((m.value(column) for m in reversed(metrics) if m.value(column) is not None), None)


def _curves(cfg: Config, run_dir: Path, metrics: list[MetricsLine]) -> list[str]:
    lines, folder = ["## Training curves", ""], RunFolder(run_dir)
    metrics_name = folder.metrics.name
    if not metrics:
        return lines + [f"No {metrics_name} lines yet: nothing to plot.", ""]
    bounds = stage_boundaries(cfg)
    for filename, title, ylabel, columns, log_y in CURVES:
        if columns == [VAL_LOSS] and cfg.train.validation is None:
            continue
        watched = columns in ([WATCH_CLASS_ACCURACY], [WATCH_FD_DOMAIN])
        if watched and (cfg.train.quality is None or _last(metrics, columns[0]) is None):
            continue  # not watched (train.quality), or an unconditional run's accuracy
        if plot_curve(folder.report_plots / filename, metrics, title, ylabel, columns, log_y, bounds):
            lines += [f"![{title}]({folder.relative(folder.report_plots / filename)})", ""]
        else:
            lines += [
                f"*{title}: not plotted, {metrics_name} has no values of {', '.join(f'`{c}`' for c in columns)}.*",
                "",
            ]
    if bounds:
        lines += ["Dashed lines: curriculum stage boundaries (the new stage's resolution).", ""]
    return lines


def _samples(run_dir: Path) -> list[str]:
    lines, folder = ["## Samples over training (EMA weights, fixed seed)", ""], RunFolder(run_dir)
    grids = sample_grids(run_dir)
    if not grids:
        return lines + [f"No sample grids in {folder.relative(folder.samples)}/ yet.", ""]
    figure = folder.report_plots / SAMPLES_FIGURE
    plot_samples_over_steps(figure, grids)
    links = [f"[step {step:,}]({folder.relative(path)})" for step, path in grids]
    return lines + [f"![samples over steps]({folder.relative(figure)})", "", "All grids: " + " · ".join(links), ""]


def _evaluation(run_dir: Path) -> list[str]:
    evaluations, folder = read_evaluations(run_dir), RunFolder(run_dir)
    if not evaluations:
        return ["## Evaluation", "", f"Not evaluated yet: run `sfumato evaluate {run_dir}`.", ""]
    grids = sorted(folder.evaluation.glob("samples-*.png"))  # what `sfumato evaluate` generated
    links = [f"[{p.stem[8:]}]({folder.relative(p)})" for p in grids]
    return (
        ["## Evaluation", ""]
        + evaluation_lines(evaluations)
        + memorisation_lines(run_dir, evaluations)
        + compositional_grid_lines(run_dir, evaluations)
        + ([f"Evaluation samples: {' · '.join(links)}", ""] if links else [])
    )


def lineage_lines(cfg: Config) -> list[str]:
    """A post-training run's (train.lineage): what it started from and what data it selected."""
    lineage, lora = cfg.train.lineage, cfg.train.lora
    if lineage is None:
        return []
    start = (
        f"`{lineage.parent}` at {lineage.checkpoint} (step {lineage.parent_step:,}; parent config "
        f"sha256 `{lineage.parent_config_sha256}`)"
        if lineage.parent
        else f"`{lineage.pretrained}`"
    )
    select = ", ".join(f"{k}: {v}" for k, v in lineage.select.items()) or "every ok row"
    method = (
        "full weights"
        if lora is None
        else f"LoRA rank {lora.rank}, alpha {lora.alpha if lora.alpha is not None else lora.rank:g} "
        "(peft; the base is frozen)"
    )
    dpo = cfg.train.dpo
    if dpo is None:
        rows = [
            ["started from", start],
            ["data filter", select],
            ["selected manifest rows", f"{lineage.selected_rows:,}"],
            ["method", method],
        ]
        return ["## Lineage (post-training)", ""] + table(["", ""], rows)
    rows = [
        ["started from", start],
        ["preference pairs", f"`{lineage.pairs}` ({lineage.pair_count:,} pairs, sha256 `{lineage.pairs_sha256}`)"],
        ["method", f"Diffusion-DPO, beta {dpo.beta:g}, against a frozen reference copy of the start; {method}"],
        ["held-out pairs", f"{dpo.holdout_fraction:.0%} (by id hash): the heldout_reward_accuracy in metrics.jsonl"],
    ]
    return ["## Lineage (alignment)", ""] + table(["", ""], rows) + _alignment_figures(cfg)


def _alignment_figures(cfg: Config) -> list[str]:
    """The last held-out reward figures of an alignment run."""
    held = [
        (m.step, m.get(AlignmentValidationRecord)) for m in read_metric_lines(RunFolder(cfg.train.output_dir).metrics)
    ]
    held = [(step, a) for step, a in held if a is not None and a.heldout_reward_accuracy is not None]
    if not held:
        return []
    step, last = held[-1]
    return [
        f"At step {step:,}: held-out implicit reward accuracy {last.heldout_reward_accuracy:.3f}, "
        f"margin {last.heldout_reward_margin:.3g}, DPO loss {last.heldout_dpo_loss:.4f} (log 2 = 0.6931 at "
        f"the reference), policy distance from the reference {last.policy_distance:.3g}.",
        "",
    ]


def write_report(run_dir: Path) -> Path:
    """run_dir/report.md and its plots in run_dir/report/; returns the report's path."""
    run_dir, folder = Path(run_dir), RunFolder(run_dir)
    cfg = load_run_config(run_dir)
    metrics = read_metric_lines(folder.metrics)
    folder.report_plots.mkdir(exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Run report: {cfg.name}", "", f"Generated {generated} from `{run_dir}`.", ""]
    lines += _summary(cfg, run_dir, metrics, training_compute(run_dir)) + lineage_lines(cfg) + _rollbacks(run_dir)
    lines += _curves(cfg, run_dir, metrics) + _samples(run_dir) + _evaluation(run_dir)
    return atomic_write(folder.report, "\n".join(lines))

"""A finished (or resumed) sweep's results: the table, the learning curves, the best config.

Everything is read back from the trials' own run folders (params.json, metrics.jsonl) plus
Tune's verdict per trial (error or not), so the results of a resumed sweep cover every trial.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from sfumato.config import Config, dump_yaml
from sfumato.layout import RunFolder, TuneFolder, atomic_write, atomic_write_json, read_json
from sfumato.records import read_metric_lines


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    status: str
    """completed | stopped early | diverged | error"""
    steps: int
    """Optimizer steps trained (the trial-steps it cost)."""
    final_val_loss: float | None
    best_val_loss: float | None
    effective_batch: float
    training_s: float | None
    """Seconds from its first to its last logged step (its start-up, before the first, not included)."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def collect(cfg: Config, proxy: Config, grid) -> list[TrialRow]:
    from sfumato.tune.space import METRIC, trial_config, trial_dir

    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        run_dir = trial_dir(cfg, trial_id)
        params = read_json(TuneFolder.params(RunFolder(run_dir))) or dict(result.config)
        lines = read_metric_lines(RunFolder(run_dir).metrics)
        curve = [(line.step, line.value(METRIC)) for line in lines if line.value(METRIC) is not None]
        steps = lines[-1].step if lines else 0
        if result.error is not None:
            status = "error"
        elif RunFolder(run_dir).stopped.exists():
            status = "diverged"
        elif steps >= proxy.train.total_steps:
            status = "completed"
        else:
            status = "stopped early"
        times = [line.time for line in lines if line.time is not None]
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params=params,
                status=status,
                steps=steps,
                final_val_loss=curve[-1][1] if curve else None,
                best_val_loss=min(v for _, v in curve) if curve else None,
                effective_batch=trial_config(cfg, params, run_dir, trial_id).train.mean_effective_batch,
                training_s=times[-1] - times[0] if len(times) > 1 else None,
                curve=curve,
                error=None if result.error is None else str(result.error).splitlines()[0][:200],
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def best_trial(rows: list[TrialRow]) -> TrialRow | None:
    """The lowest final val_loss among trials that ran to the end (early-stopped trials were
    measured at fewer steps); among all trials with a val_loss when none did."""
    scored = [r for r in rows if r.final_val_loss is not None]
    completed = [r for r in scored if r.status == "completed"]
    return min(completed or scored, key=lambda r: r.final_val_loss, default=None)


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def write_table(out: Path, cfg: Config, rows: list[TrialRow], best: TrialRow | None, total_steps: int) -> None:
    from sfumato.documents import table

    keys = list(cfg.tune.search_space)
    header = ["trial", *keys, "effective_batch", "status", "steps", "final_val_loss", "best_val_loss", "training_s"]
    ranked = sorted(rows, key=lambda r: (r.status != "completed", r.final_val_loss is None, r.final_val_loss or 0))
    folder = TuneFolder(out)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    for r in ranked:
        writer.writerow(
            [
                r.trial_id,
                *(r.params.get(k) for k in keys),
                r.effective_batch,
                r.status,
                r.steps,
                r.final_val_loss,
                r.best_val_loss,
                r.training_s,
            ]
        )
    atomic_write(folder.results_csv, text.getvalue())
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped early", "diverged", "error")}
    spent = sum(r.steps for r in rows)
    lines = [
        f"# Sweep `{cfg.name}`",
        "",
        f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
        f"Trial-steps spent: {spent:,} of {len(rows) * total_steps:,} had every trial run its {total_steps} "
        f"steps ({spent / max(1, len(rows) * total_steps):.0%}). Scheduler: {cfg.tune.scheduler.kind}, "
        f"search: {cfg.tune.search.algorithm}. Ranked by final validation loss (EMA weights, held-out "
        "images); completed trials first.",
        "",
    ]
    lines += table(
        [
            "trial",
            *(f"`{_short(k)}`" for k in keys),
            "eff. batch",
            "status",
            "steps",
            "final val_loss",
            "best val_loss",
            "training s",
        ],
        [
            [
                ("**" + r.trial_id + "**") if r is best else r.trial_id,
                *(r.params.get(k) for k in keys),
                r.effective_batch,
                r.status,
                r.steps,
                r.final_val_loss,
                r.best_val_loss,
                r.training_s,
            ]
            for r in ranked
        ],
    )
    lines += [f"![learning curves]({folder.curves.name})", ""]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["## Errors", ""] + [f"- `{r.trial_id}`: {r.error}" for r in errors] + [""]
    atomic_write(folder.results_md, "\n".join(lines))


def plot_curves(path: Path, rows: list[TrialRow], best: TrialRow | None, grace_steps: int | None) -> None:
    """val_loss against step for every trial; early-stopped trials end with a cross, the best is bold."""
    from sfumato.documents import new_figure

    fig = new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for r in rows:
        if not r.curve:
            continue
        steps, values = zip(*r.curve)
        is_best = r is best
        ax.plot(
            steps,
            values,
            color="black" if is_best else None,
            linewidth=2.2 if is_best else 1.0,
            alpha=1.0 if is_best else 0.7,
            label=f"{r.trial_id} (best)" if is_best else None,
            zorder=3 if is_best else 2,
        )
        if r.status != "completed":
            ax.plot(steps[-1], values[-1], marker="x", color="grey")
    if grace_steps:
        ax.axvline(grace_steps, color="grey", linestyle="--", linewidth=0.8)
    ax.set(title="Validation loss per trial (x: stopped early)", xlabel="optimizer step", ylabel="val_loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_best(out: Path, cfg: Config, best: TrialRow) -> dict:
    """best_config.yaml: the full run with the best trial's values (LR moved to its batch)."""
    from sfumato.tune.space import best_run_config, trial_config, trial_dir

    trial_cfg = trial_config(cfg, best.params, trial_dir(cfg, best.trial_id), "x")
    full, how = best_run_config(cfg, best.params, trial_cfg)
    header = [
        f"# The best trial of sweep {cfg.name} ({best.trial_id}: final val_loss {best.final_val_loss:.5g} "
        f"at {best.steps} proxy steps), as a full run: `sfumato train --config {TuneFolder(out).best_config}`.",
        f"# Tuned values, moved from the proxy's effective batch {how['effective_batch_proxy']:g} to the full "
        f"run's {how['effective_batch_full']:g} ({how['lr_scaling']} learning-rate rule):",
    ]
    header += [f"#   {k}: {how['proxy_values'][k]!r} -> {how['full_values'][k]!r}" for k in how["proxy_values"]]
    header += ["# Every other key is the full run's (the proxy-only keys of tune.proxy are not carried over)."]
    folder = TuneFolder(out)
    atomic_write(folder.best_config, "\n".join(header) + "\n" + dump_yaml(full))
    info = {
        "trial_id": best.trial_id,
        "final_val_loss": best.final_val_loss,
        "steps": best.steps,
        **how,
        "config": str(folder.best_config),
    }
    atomic_write_json(folder.best, info)
    return info


def write_results(cfg: Config, proxy: Config, grid) -> dict:
    out = cfg.tune.output_dir
    rows = collect(cfg, proxy, grid)
    best = best_trial(rows)
    total = proxy.train.total_steps
    write_table(out, cfg, rows, best, total)
    plot_curves(
        TuneFolder(out).curves,
        rows,
        best,
        cfg.tune.scheduler.grace_period_steps if cfg.tune.scheduler.kind == "asha" else None,
    )
    summary = {
        "trials": len(rows),
        **{
            s.replace(" ", "_"): sum(r.status == s for r in rows)
            for s in ("completed", "stopped early", "diverged", "error")
        },
        "trial_steps": sum(r.steps for r in rows),
        "trial_steps_if_all_completed": len(rows) * total,
        "results": str(TuneFolder(out).results_md),
        "curves": str(TuneFolder(out).curves),
        "trials_by_id": {
            r.trial_id: {"status": r.status, "steps": r.steps, "final_val_loss": r.final_val_loss, "params": r.params}
            for r in rows
        },
    }
    if best is not None:
        summary["best"] = write_best(out, cfg, best)
    return summary

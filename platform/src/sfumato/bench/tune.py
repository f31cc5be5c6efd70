"""`sfumato bench tune`: the same sweep with ASHA early stopping and with every trial run to the
end, in one run, on real CIFAR-10 images.

Both sweeps are configs/debug.yaml's sweep with the seeded random searcher, so they draw exactly
the same trial configs in the same order (TPE would steer each sweep by its own results, and the
two could no longer be compared trial by trial). Figures: trial-steps (optimizer steps trained,
summed over trials), wall time, and whether both sweeps pick the same best config; if not, where
each best ranks in the other's ranking.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from sfumato.bench import add_datasets_argument, add_out_argument, add_repo_argument, checkout, publish
from sfumato.bench.ingest import machine


def _cifar_folder(datasets: Path, dest: Path, per_class: int) -> Path:
    archive = datasets / "cifar10-train.tar.gz"
    if not archive.exists():
        raise FileNotFoundError(f"{archive} does not exist: pass --datasets with the folder holding it")
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            cls = str(Path(member.name).parent)
            if not member.isfile() or taken.get(cls, 0) >= per_class:
                continue
            taken[cls] = taken.get(cls, 0) + 1
            tar.extract(member, dest, filter="data")  # refuses members that would land outside dest
    return dest / "train"


def _key(params: dict) -> str:
    return json.dumps({k: round(v, 12) if isinstance(v, float) else v for k, v in sorted(params.items())})


def _ranking(summary: dict) -> list[str]:
    """The configs (as keys) of the trials that ran to the end, best final val_loss first."""
    trials = summary["trials_by_id"].values()
    done = sorted(
        (t for t in trials if t["status"] == "completed" and t["final_val_loss"] is not None),
        key=lambda t: t["final_val_loss"],
    )
    return [_key(t["params"]) for t in done]


def add_arguments(parser) -> None:
    parser.add_argument("--trials", type=int, default=12, help="trials per sweep")
    parser.add_argument("--steps", type=int, default=40, help="proxy steps per trial")
    parser.add_argument("--reduction-factor", type=float, default=4.0, help="ASHA's reduction factor")
    parser.add_argument("--images", type=int, default=5000, help="CIFAR-10 images the sweeps train on")
    parser.add_argument("--workers", type=int, default=2, help="trials at once (and Ray's CPUs)")
    add_datasets_argument(parser, "cifar10-train.tar.gz")
    add_repo_argument(parser, "configs/debug.yaml, whose sweep both runs are")
    add_out_argument(parser)


def run(args) -> dict:
    from sfumato.config import load_config
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards
    from sfumato.runtime import init_ray
    from sfumato.tune.sweep import run_sweep

    repo = checkout(args.repo, "configs/debug.yaml")
    grace = max(1, args.steps // round(args.reduction_factor**2))
    result = {
        "machine": machine(),
        "trials": args.trials,
        "proxy_steps": args.steps,
        "grace_period_steps": grace,
        "reduction_factor": args.reduction_factor,
        "concurrent_trials": args.workers,
        "sweeps": {},
    }
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-tune-") as tmp:
        tmp = Path(tmp)
        images = _cifar_folder(Path(args.datasets), tmp / "cifar", args.images // 10)
        sources = [{"kind": "folder", "name": "cifar", "path": str(images), "license": "research-only"}]
        common = [
            f"data.output_dir={tmp / 'data'}",
            f"data.sources={yaml.safe_dump(sources, default_flow_style=True)}",
            f"ray.num_cpus={args.workers}",
            "tune.search.algorithm=random",
            f"tune.search.num_trials={args.trials}",
            f"tune.search.max_concurrent_trials={args.workers}",
            f"tune.proxy.train.stages=[{{resolution_px: 16, steps: {args.steps}, micro_batch_size: 8}}]",
            f"tune.scheduler.grace_period_steps={grace}",
            f"tune.scheduler.reduction_factor={args.reduction_factor}",
            f"tune.proxy.train.checkpoint_every_steps={args.steps}",
        ]
        cfg = load_config(repo / "configs" / "debug.yaml", common + [f"tune.output_dir={tmp / 'asha'}"])
        init_ray(cfg.ray, dashboard=True)  # the sweeps need the dashboard; the data stages share this Ray
        run_ingest(cfg)
        run_shards(cfg)
        result["images"] = len(list(images.rglob("*.jpg")))
        summaries = {}
        for kind in ("asha", "fifo"):
            cfg = load_config(
                repo / "configs" / "debug.yaml",
                common + [f"tune.output_dir={tmp / kind}", f"tune.scheduler.kind={kind}"],
            )
            start = time.perf_counter()
            summary = run_sweep(cfg)
            seconds = time.perf_counter() - start
            summaries[kind] = summary
            best = summary.get("best", {})
            result["sweeps"][kind] = {
                "wall_s": round(seconds, 1),
                "trial_steps": summary["trial_steps"],
                "trial_steps_if_all_completed": summary["trial_steps_if_all_completed"],
                "completed": summary["completed"],
                "stopped_early": summary["stopped_early"],
                "errors": summary["error"],
                "diverged": summary["diverged"],
                "best_final_val_loss": best.get("final_val_loss"),
                "best_params": best.get("proxy_values"),
            }
    asha, fifo = result["sweeps"]["asha"], result["sweeps"]["fifo"]
    full_ranking, asha_ranking = _ranking(summaries["fifo"]), _ranking(summaries["asha"])
    asha_best, fifo_best = _key(asha["best_params"] or {}), _key(fifo["best_params"] or {})
    result["asha_trial_steps_fraction"] = round(asha["trial_steps"] / fifo["trial_steps"], 3)
    result["asha_wall_fraction"] = round(asha["wall_s"] / fifo["wall_s"], 3)
    result["same_best_config"] = asha_best == fifo_best
    result["asha_best_rank_in_full_sweep"] = full_ranking.index(asha_best) + 1 if asha_best in full_ranking else None
    result["full_best_stopped_by_asha"] = fifo_best not in asha_ranking
    result["target_met"] = result["asha_trial_steps_fraction"] <= 0.40
    return publish(result, report(result), args.out)


def report(r: dict) -> str:
    asha, fifo = r["sweeps"]["asha"], r["sweeps"]["fifo"]
    lines = [
        f"machine: {r['machine']}",
        f"{r['trials']} trials (random search, the same configs in both sweeps), {r['images']} CIFAR-10 images, "
        f"16 px proxy of {r['proxy_steps']} steps, {r['concurrent_trials']} trials at once; ASHA grace "
        f"{r['grace_period_steps']} steps, reduction factor {r['reduction_factor']:g}",
        "",
        "| sweep | trial-steps | wall s | completed | stopped early | best final val_loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in (("ASHA", asha), ("every trial to the end", fifo)):
        lines.append(
            f"| {name} | {s['trial_steps']} | {s['wall_s']} | {s['completed']} | {s['stopped_early']} | "
            f"{s['best_final_val_loss']:.4f} |"
        )
    lines += [
        "",
        f"ASHA spent {r['asha_trial_steps_fraction']:.0%} of the full sweep's trial-steps "
        f"(target <= 40%: {'met' if r['target_met'] else 'NOT met'}) and {r['asha_wall_fraction']:.0%} of its "
        f"wall time.",
        f"same best config: {'yes' if r['same_best_config'] else 'no'}; ASHA's best is number "
        f"{r['asha_best_rank_in_full_sweep']} of the full sweep's ranking; the full sweep's best was "
        f"{'stopped early' if r['full_best_stopped_by_asha'] else 'run to the end'} by ASHA.",
    ]
    return "\n".join(lines)

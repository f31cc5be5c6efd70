"""`sfumato bench finetune --config CFG --from RUN_DIR`: LoRA against full fine-tuning of the
same trained run, on the same subset (the config's finetune.select), steps and data, in one run.

Each side is a real `sfumato finetune` run (Ray Train + DeepSpeed; the config's finetune
section, with finetune.lora for LoRA and none for full weights, the same overrides). Measured:
trainable parameters, samples/s (the metrics' windows after the first), peak memory (the
workers' largest memory_mb), the last checkpoint's size on disk, and what the fine-tune did to
the model, with the offline yardstick (sfumato.evaluate.domain, the run's classes):

- subset share: of `--samples` images drawn with no class (the null label, no guidance), the
  share the yardstick classifies as one of the subset's classes (the innermost tags of the
  selected rows). Before: the parent's base rate. Target (issue 17): >= 0.8 after.
- other classes: class accuracy of images asked for each class outside the subset (with the
  config's evaluate.guidance_scale): do they stay recognisable?

Both are also measured for the parent, with the same seeds.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from sfumato.bench import add_out_argument


def _checkpoint_mb(run_dir: Path) -> float:
    from sfumato import checkpoint as ckpt
    from sfumato.layout import RunFolder

    last = ckpt.latest(RunFolder(run_dir).checkpoints)
    return sum(p.stat().st_size for p in last.rglob("*") if p.is_file()) / 2**20


def measure_model(cfg, run, yardstick, subset: set[str], samples: int, steps: int) -> dict:
    """The subset share of unconditional samples and the class accuracy of the other classes."""
    import torch

    from sfumato.diffusion.sample import sample
    from sfumato.models.run import pipeline

    e = cfg.evaluate
    pipe = pipeline(cfg, run, e.sampler)
    names = yardstick.class_names
    res = yardstick.classifier.resolution_px

    def classify(images: torch.Tensor) -> np.ndarray:
        if images.shape[-1] != res:
            images = torch.nn.functional.interpolate(images, size=(res, res), mode="bilinear", antialias=True)
        return yardstick.classifier.predict(images * 2 - 1)

    free = classify(sample(pipe, samples, e.seed, steps, 1.0, None))
    share = float(np.mean([names[p] in subset for p in free]))
    others = [i for i, n in enumerate(run.class_names) if n not in subset]
    asked = [others[i % len(others)] for i in range(samples)] if others else []
    accuracy = None
    if asked:
        predicted = classify(sample(pipe, len(asked), e.seed + 10**6, steps, e.guidance_scale, asked))
        accuracy = float(np.mean([names[p] == run.class_names[a] for p, a in zip(predicted, asked)]))
    counts = {n: int(sum(names[p] == n for p in free)) for n in names}
    return {
        "subset_share": round(share, 4),
        "other_class_accuracy": None if accuracy is None else round(accuracy, 4),
        "unconditional_classes": counts,
    }


def _train_side(cfg, parent: Path, lora: bool, out: Path) -> tuple[object, dict]:
    from sfumato.config import apply, run_tree, validated
    from sfumato.layout import RunFolder
    from sfumato.records import TrainStepRecord, read_metric_lines
    from sfumato.train.finetune import run_config
    from sfumato.train.loop import run_training

    tree = run_tree(cfg)
    tree["finetune"]["overrides"] = {**tree["finetune"]["overrides"], "train.output_dir": str(out)}
    if not lora:
        tree["finetune"]["lora"] = None
    tree = apply(tree, {})
    tuned = run_config(validated(tree, "the bench's fine-tune"), parent=parent)
    start = time.perf_counter()
    run_training(tuned)
    wall = time.perf_counter() - start
    windows = [line.get(TrainStepRecord) for line in read_metric_lines(RunFolder(out).metrics)]
    windows = [w for w in windows if w is not None]
    rate = [w.samples_per_s for w in windows[1:]] or [w.samples_per_s for w in windows]
    return tuned, {
        "wall_s": round(wall, 1),
        "samples_per_s": round(sum(rate) / len(rate), 2),
        "peak_memory_mb": round(max(w.memory_mb for w in windows), 1),
        "checkpoint_mb": round(_checkpoint_mb(out), 3),
        "steps": tuned.train.total_steps,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="a config with a finetune section (required)")
    parser.add_argument("--from", dest="parent", default=None, metavar="RUN_DIR", help="the trained run (required)")
    parser.add_argument("--samples", type=int, default=160, help="images per measure")
    parser.add_argument("--sides", default="lora,full", help="which fine-tunes run (lora, full or both)")
    parser.add_argument("--out-dir", default=None, help="the fine-tune runs (default runs/bench-finetune)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. finetune.lora.rank=16")
    add_out_argument(parser)


def run(args) -> dict:
    import torch

    from sfumato.bench.ingest import machine
    from sfumato.config import load_config, load_run_config
    from sfumato.evaluate.evaluate import domain_yardstick
    from sfumato.models.run import load_trained

    if not args.config or not args.parent:
        raise SystemExit("sfumato bench finetune needs --config (with a finetune section) and --from RUN_DIR")
    cfg = load_config(args.config, args.overrides)
    if cfg.finetune is None:
        raise SystemExit(f"{args.config} has no finetune section")
    parent = Path(args.parent)
    out_root = Path(args.out_dir or "runs/bench-finetune").resolve()
    shutil.rmtree(out_root, ignore_errors=True)
    parent_cfg = load_run_config(parent)
    yardstick = domain_yardstick(parent_cfg)
    from sfumato.config import SelectConfig
    from sfumato.train.finetune import selected_rows

    rows = selected_rows(cfg.data.output_dir, SelectConfig(**cfg.finetune.select.model_dump()))
    subset = {tags[-1] for tags in rows["tags"] if len(tags)}
    steps = cfg.evaluate.steps
    torch.manual_seed(0)
    _, run, _ = load_trained(parent)
    result = {
        "machine": machine(),
        "parent": str(parent),
        "subset_classes": sorted(subset),
        "selected_rows": len(rows),
        "samples": args.samples,
        "sampling_steps": steps,
        "yardstick_real_accuracy": yardstick.real_accuracy,
        "parent_model": {
            "trainable_parameters": sum(p.numel() for p in run.denoiser.parameters()),
            **measure_model(parent_cfg, run, yardstick, subset, args.samples, steps),
        },
    }
    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    if not sides or set(sides) - {"lora", "full"}:
        raise SystemExit(f"--sides {args.sides!r}: a comma list of lora and full")
    for side, lora in (("lora", True), ("full", False)):
        if side not in sides:
            continue
        tuned, figures = _train_side(cfg, parent, lora, out_root / side)
        _, run, _ = load_trained(tuned.train.output_dir)
        trainable = sum(p.numel() for n, p in run.denoiser.named_parameters() if not lora or "lora_" in n)
        total = sum(p.numel() for n, p in run.denoiser.named_parameters() if "lora_" not in n)
        result[side] = {
            **figures,
            "trainable_parameters": trainable,
            "trainable_share": round(trainable / total, 4),
            **measure_model(tuned, run, yardstick, subset, args.samples, steps),
        }
        print(json.dumps({side: result[side]}, default=str))
    lines = [
        f"\nfine-tune of {parent} on {sorted(subset)} ({len(rows)} rows), {result[sides[0]]['steps']} steps",
        f"{'':8} {'trainable':>12} {'samples/s':>10} {'peak MB':>9} {'ckpt MB':>9} "
        f"{'subset share':>13} {'others acc':>11}",
    ]
    for side in ("parent_model", *sides):
        r = result[side]
        lines.append(
            f"{side:8.8} {r['trainable_parameters']:>12,} {r.get('samples_per_s', '-'):>10} "
            f"{r.get('peak_memory_mb', '-'):>9} {r.get('checkpoint_mb', '-'):>9} {r['subset_share']:>13} "
            f"{r['other_class_accuracy']!s:>11}"
        )
    print("\n".join(lines))
    out = Path(args.out) if args.out else out_root / "finetune.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    return result

"""`sfumato bench compositional`: the compositional yardstick's validation (issue 34).

A judge is worth its numbers only if it calls right what is right and wrong what is wrong. The
segmenter (sfumato.evaluate.compositional) is trained `--repeats` times with the same settings
(evaluate.compositional.segmenter's defaults, `--scenes`/`--epochs` to change them) at
`--resolution`, and each copy scores, for every evaluation prompt of both splits (seen, and
held-out of `--held-out`: the text pilot's list by default), `--images-per-prompt` images:

    real      rendered scenes that make the prompt true (the ceiling: should be ~1)
    degraded  the same blurred, tinted, mottled and noised, as a generated image is
    shuffled  the same scored against another prompt of the task whose rules differ (should be ~0)
    chance    random training scenes scored against the prompts: what a model that ignores its
              prompt scores (not 0: a random scene often holds the asked shape)
    noise     Gaussian noise clamped to [-1, 1] (the floor: should be 0)

per task and overall (the mean of the task accuracies), with the training's wall and CPU time;
"same numbers" says whether every copy gave the same figures.
"""

from __future__ import annotations

import time

from sfumato.bench import add_out_argument, publish

PILOT_HELD_OUT = ["purple star", "orange circle", "green triangle", "three squares"]  # configs/pilot-text.yaml


def add_arguments(parser) -> None:
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (the run's last)")
    parser.add_argument("--held-out", nargs="*", default=PILOT_HELD_OUT, help="held-out combinations")
    parser.add_argument("--prompts-per-task", type=int, default=8, help="evaluation prompts per task and split")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="rendered images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the prompts, the rendered scenes and the noise")
    parser.add_argument("--repeats", type=int, default=2, help="trainings with the same settings")
    parser.add_argument("--scenes", type=int, default=None, help="training scenes (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    add_out_argument(parser)


def run(args) -> dict:
    from sfumato.bench.ingest import machine
    from sfumato.config import SegmenterConfig
    from sfumato.data.scenes import HeldOut, evaluation_prompts
    from sfumato.evaluate.compositional import train_segmenter, validate

    updates = {k: v for k, v in (("scenes", args.scenes), ("epochs", args.epochs)) if v is not None}
    settings = SegmenterConfig(**updates)
    prompts = evaluation_prompts(HeldOut(args.held_out), args.prompts_per_task, args.seed)
    trainings, figures = [], []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        yardstick = train_segmenter(args.resolution, settings)
        trainings.append({"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)})
        figures.append(validate(yardstick, prompts, args.images_per_prompt, args.seed, HeldOut(args.held_out)))
    result = {
        "machine": machine(),
        "resolution_px": args.resolution,
        "held_out": args.held_out,
        "prompts_per_task": args.prompts_per_task,
        "images_per_prompt": args.images_per_prompt,
        "settings": settings.model_dump(mode="json"),
        "trainings": trainings,
        "figures": figures[0],
        "same_numbers": all(f == figures[0] for f in figures[1:]),
    }
    return publish(result, report(result), args.out)


def report(r: dict) -> str:
    from sfumato.data.scenes import TASKS
    from sfumato.evaluate.compositional import SHORT_TASKS, SPLIT_NAMES

    m, s = r["machine"], r["settings"]
    times = ", ".join(f"{t['wall_s']} s ({t['cpu_s']} CPU-s)" for t in r["trainings"])
    lines = [
        f"machine: {m['cpu']}, {m['nproc']} CPUs, load average at start {m['load_avg_at_start']}",
        f"segmenter at {r['resolution_px']} px: {s['scenes']} scenes x {s['epochs']} epochs, batch {s['batch_size']}, "
        f"width {s['width']}; training {times}",
        f"prompts: {r['prompts_per_task']} per task and split, {r['images_per_prompt']} images each; "
        f"held out: {', '.join(r['held_out'])}",
        "",
        f"{'split, images':20} {'count':>6} {'overall':>8} " + " ".join(f"{SHORT_TASKS[t]:>8}" for t in TASKS),
    ]
    for split, figures in r["figures"].items():
        for kind, score in figures.items():
            tasks = " ".join(f"{score['tasks'][t]:>8.3f}" if t in score["tasks"] else f"{'-':>8}" for t in TASKS)
            label = f"{SPLIT_NAMES.get(split, split)} {kind}"
            lines.append(f"{label:20} {score['images']:>6} {score['overall']:>8.3f} {tasks}")
    lines += ["", f"same numbers in {len(r['trainings'])} trainings with one seed: {r['same_numbers']}"]
    return "\n".join(lines)

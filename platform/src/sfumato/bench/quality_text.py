"""`sfumato bench quality --text`: text-to-image recipes at equal CPU time on the compositional
world, scored per GenEval task by the offline compositional yardstick.

Every recipe gets the same CPU seconds, the same 32 px scenes (configs/pilot-text.yaml's demo
source: its count, its held-out combinations, drawn at its size and resized as its shards are),
the same captions in the same batches, a BPE tokenizer trained on those captions and a text
encoder trained from scratch with the denoiser. A recipe is a config file plus dotted overrides;
its model, objective, optimizer, EMA, condition dropout and guidance are what it says, trained
by sfumato's own `train_step` with `PlainEngine` for DeepSpeed (as `bench quality`), in one
curriculum-free stage at 32 px with the config's last stage's micro-batch, so only the recipe
differs. The default recipes:

  before        what a user got before issue 34: configs/pilot.yaml with
                `train.model=unet-text-tiny train.conditioning=text` (cross-attention at 16 px)
  pilot-text    configs/pilot-text.yaml as shipped (unet-text-xs: cross-attention at 8 px)

The clock is the process's CPU time in training steps (run it on an idle machine; see
`bench quality`). Every `--score-every` CPU seconds the EMA weights draw `--images-per-prompt`
images for each evaluation prompt of both splits (seen, held-out; fixed noise seeds) and the
yardstick scores them: per-task accuracy and the overall mean. `--seeds N` repeats the race
with N seeds (weights, batches, noise; the data and the yardstick stay) and reports the mean and
spread of the final scores with the per-seed figures. `--shuffled-captions` trains every recipe on
the same captions permuted across the scenes (each image with another image's caption): a model
that cannot learn its prompts, the floor a recipe's score is read against.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from sfumato.bench import checkout, load_recipe, publish
from sfumato.bench.clock import on_the_clock

RESOLUTION_PX = 32
DEFAULT_RECIPES = {
    "before": "configs/pilot.yaml,train.model=unet-text-tiny,train.conditioning=text",
    "pilot-text": "configs/pilot-text.yaml",
}


def scenes_source(repo: Path):
    """configs/pilot-text.yaml's scenes source (count, size, seed, held-out combinations)."""
    from sfumato.config import load_config

    cfg = load_config(repo / "configs" / "pilot-text.yaml", inputs=False)
    return next(s for s in cfg.data.sources if s.kind == "demo" and s.mode == "scenes")


def draw_world(src, num_images: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, 32, 32, 3] scenes and their captions, drawn as the demo source draws them and
    resized as the shards resize them."""
    from sfumato.data.decode import render as resize
    from sfumato.data.scenes import HeldOut, draw_scene, render

    rng, held_out = np.random.default_rng(src.seed), HeldOut(src.held_out)
    images, captions = [], []
    for _ in range(num_images):
        scene = draw_scene(rng, held_out)
        images.append(np.asarray(resize(render(scene.objects, src.image_size_px), RESOLUTION_PX, "center_crop")))
        captions.append(scene.caption)
    return np.stack(images), captions


def shuffled(captions: list[str], seed: int = 0) -> list[str]:
    """The captions permuted across the scenes: the same words, no longer about their images."""
    return [captions[i] for i in np.random.default_rng(seed).permutation(len(captions))]


def batches(images: np.ndarray, captions: list[str], batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(captions))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {
                "image": images[idx],
                "caption": [captions[i] for i in idx],
                "class": np.full(len(idx), -1, np.int64),
                "id": [str(i) for i in idx],
            }


class TextTrainer:
    """A recipe's denoiser and text encoder through sfumato's train_step, LR schedule and EMA."""

    def __init__(self, cfg, tokenizer, seed: int):
        from sfumato.diffusion.schedule import NoiseSchedule
        from sfumato.models.registry import build_denoiser, empty_like
        from sfumato.models.repa import attach
        from sfumato.models.run import training_levers
        from sfumato.models.text import build_text_encoder
        from sfumato.train.ema import EMA, ema_beta
        from sfumato.train.step import PlainEngine, TrainState

        self.cfg, self.tokenizer = cfg, tokenizer
        t = cfg.train
        self.micro_batch = t.stages[-1].micro_batch_size
        torch.manual_seed(seed)
        model = build_denoiser(t.model, RESOLUTION_PX, 3, None, build_text_encoder(t.text, tokenizer))
        training_levers(model, t)
        repa = None if t.repa is None else attach(model, t.repa)
        self.state = TrainState(
            engine=PlainEngine(model, t.optimizer, grad_clip_norm=t.grad_clip_norm),
            schedule=NoiseSchedule.from_config(cfg.diffusion),
            diffusion_cfg=cfg.diffusion,
            generator=torch.Generator().manual_seed(seed),
            device=torch.device("cpu"),
            tokenizer=tokenizer,
            max_length=t.text.max_length,
            repa=repa,
        )
        self.ema = EMA(model, ema_beta(t.ema.decay, t.ema.halflife_samples, self.micro_batch, self.micro_batch))
        self.ema_model = empty_like(model)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.progress = 0.0  # the share of the CPU budget spent (bench.clock sets it)

    def step(self, batch: dict) -> float:
        from sfumato.models.run import training_levers
        from sfumato.train.step import lr_at, train_step

        if self.cfg.train.masking is not None:  # masked until the budget's last unmasked_fraction
            training_levers(self.state.engine.module, self.cfg.train, self.progress)

        self.state.engine.set_lr(lr_at(self.state.step, self.cfg.train.optimizer, 10**6))
        out = train_step(self.state, batch)
        self.ema.update(self.state.engine.module)
        return float(out["loss"])

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, steps: int, batch_size: int = 64) -> np.ndarray:
        """uint8 NHWC images, image i from the noise of seed + i."""
        from sfumato.diffusion.pipeline import SfumatoPipeline
        from sfumato.diffusion.sample import make_sampler, sample

        e = self.cfg.evaluate
        self.ema.copy_to(self.ema_model)
        self.ema_model.eval()
        pipe = SfumatoPipeline(
            unet=self.ema_model.net,
            scheduler=make_sampler(self.cfg.diffusion, e.sampler, RESOLUTION_PX),
            text_encoder=self.ema_model.text_encoder,
            tokenizer=self.tokenizer,
            text_max_length=self.cfg.train.text.max_length,
        )
        pipe.set_progress_bar_config(disable=True)
        out = []
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            images = sample(pipe, len(chunk), seed, steps, e.guidance_scale, chunk, first_index=first)
            out.append((images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        return np.concatenate(out)


def score_splits(yardstick, images: np.ndarray, plan: dict[str, list]) -> dict:
    """{split: {"overall", "tasks"}} of images generated for the plan's prompts, split after split."""
    out, first = {}, 0
    for split, prompts in plan.items():
        result = yardstick.score(images[first : first + len(prompts)], prompts)
        out[split] = {"overall": result.overall, "tasks": result.tasks}
        first += len(prompts)
    return out


def race(trainer: TextTrainer, name: str, feed, yardstick, plan: dict[str, list], args) -> list[dict]:
    """Train for args.cpu_seconds of CPU time, scoring every args.score_every (bench quality's clock)."""
    prompts = [p.text for split in plan.values() for p in split]

    def judge(point: dict) -> dict:
        images = trainer.generate(prompts, args.seed_noise, args.sample_steps)
        point |= score_splits(yardstick, images, plan)
        print(
            f"  {name:12s} {point['cpu_s']:7.0f} CPU-s {point['steps']:5d} steps loss {point['loss']:.4f}  "
            f"seen {point['seen']['overall']:.3f}  held-out {point['held_out']['overall']:.3f}",
            flush=True,
        )
        return point

    return on_the_clock(trainer, feed, args.cpu_seconds, args.score_every, judge)


def summarise(finals: list[dict]) -> dict:
    """Mean and spread (sample std) over seeds of every task's final accuracy, per split."""
    out = {}
    for split in ("seen", "held_out"):
        keys = finals[0][split]["tasks"].keys()
        per_task = {k: [f[split]["tasks"][k] for f in finals] for k in keys}
        overall = [f[split]["overall"] for f in finals]
        out[split] = {
            "overall": {
                "mean": float(np.mean(overall)),
                "std": float(np.std(overall, ddof=1)) if len(overall) > 1 else 0.0,
                "seeds": overall,
            },
            "tasks": {
                k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "seeds": v}
                for k, v in per_task.items()
            },
        }
    return out


def time_to_target(results: dict, reference: str) -> dict:
    """When each recipe's seed-mean curve first reaches the reference recipe's final seed-mean
    score, per split: {"reference", split: {recipe: {"target", "cpu_s", "share"}}} (cpu_s None:
    not within its budget). The curves are scored at the same CPU seconds, so seed means align."""
    out: dict = {"reference": reference}
    budget = results[reference]["cpu_s"]
    for split in ("seen", "held_out"):
        target = results[reference]["summary"][split]["overall"]["mean"]
        out[split] = {}
        for name, r in results.items():
            points = min(len(c) for c in r["curves"])
            mean = [np.mean([c[i][split]["overall"] for c in r["curves"]]) for i in range(points)]
            when = next((r["curves"][0][i]["cpu_s"] for i in range(points) if mean[i] >= target), None)
            out[split][name] = {
                "target": target,
                "cpu_s": when,
                "share": None if when is None else round(when / budget, 3),
            }
    return out


def target_lines(versus: dict) -> str:
    reference, lines = versus["reference"], []
    for split in ("seen", "held_out"):
        cells = [
            f"{name} not reached" if v["cpu_s"] is None else f"{name} at {v['cpu_s']:.0f} CPU-s ({v['share']:.2f})"
            for name, v in versus[split].items()
            if name != reference
        ]
        target = next(iter(versus[split].values()))["target"]
        lines.append(f"{split}: {reference}'s final {target:.3f} reached by " + "; ".join(cells))
    return "\n".join(lines)


def merged(paths: list[str], versus: str | None, out: str | None) -> dict:
    """Races run as separate processes (a recipe or seed range each, side by side) joined into one
    table and time to target, as one run of all of them would print."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    results: dict = {}
    for run in runs:
        for name, r in run["recipes"].items():
            if name in results:  # more seeds of a recipe: their curves, finals and step counts joined
                joined = results[name]
                joined["curves"] = joined["curves"] + r["curves"]
                joined["summary"] = summarise([c[-1] for c in joined["curves"]])
                joined["steps"] = int(np.mean([c[-1]["steps"] for c in joined["curves"]]))
            else:
                results[name] = dict(r)
    reference = versus or next(iter(results))
    result = {
        **{k: v for k, v in runs[0].items() if k not in ("recipes", "wall_s", "seeds", "plot")},
        "merged_from": list(paths),
        "recipes": results,
        "versus": time_to_target(results, reference),
    }
    return publish(result, table(results) + "\n\n" + target_lines(result["versus"]), out)


def table(results: dict) -> str:
    lines = []
    for split in ("seen", "held_out"):
        tasks = list(next(iter(results.values()))["summary"][split]["tasks"])
        lines += [
            f"\n{split} prompts (mean ± std over seeds)\n",
            "| recipe | CPU-s | steps | " + " | ".join(tasks) + " | overall |",
            "|---|---|---|" + "---|" * (len(tasks) + 1),
        ]
        for name, r in results.items():
            s = r["summary"][split]
            cells = [f"{s['tasks'][k]['mean']:.2f} ± {s['tasks'][k]['std']:.2f}" for k in tasks]
            lines.append(
                f"| {name} | {r['cpu_s']:.0f} | {r['steps']} | "
                + " | ".join(cells)
                + f" | **{s['overall']['mean']:.3f} ± {s['overall']['std']:.3f}** |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(results.values()))["summary"]["seen"]["tasks"])
    panels = ["overall", *tasks]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6), squeeze=False)
    for row, split in enumerate(("seen", "held_out")):
        for column, key in enumerate(panels):
            ax = axes[row][column]
            for name, r in results.items():
                for i, curve in enumerate(r["curves"]):
                    ys = [p[split]["overall"] if key == "overall" else p[split]["tasks"][key] for p in curve]
                    ax.plot(
                        [p["cpu_s"] for p in curve],
                        ys,
                        marker=".",
                        color=f"C{list(results).index(name)}",
                        alpha=0.8,
                        label=name if i == 0 else None,
                    )
            ax.set_title(f"{split}: {key}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("training CPU s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_text(args) -> dict:
    if args.merge:
        return merged(args.merge, args.versus, args.out)
    from sfumato.bench.ingest import machine
    from sfumato.config.evaluate import SegmenterConfig
    from sfumato.data.scenes import HeldOut, evaluation_prompts
    from sfumato.evaluate.compositional import load_or_train_segmenter, repeat
    from sfumato.models.text import train_tokenizer

    repo = checkout(args.repo, "configs/pilot-text.yaml")
    out_dir = Path(args.out_dir or "runs/bench-quality-text")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = scenes_source(repo)
    recipes = dict(DEFAULT_RECIPES)
    for spec in args.recipe or []:
        name, _, value = spec.partition("=")
        recipes[name.strip()] = value
    if args.recipes:
        recipes = {k: recipes[k] for k in args.recipes.split(",")}
    started = time.perf_counter()
    images, captions = draw_world(src, args.scene_images or src.num_images)
    trained_on = shuffled(captions) if args.shuffled_captions else captions
    yardstick = load_or_train_segmenter(RESOLUTION_PX, out_dir / "segmenter", SegmenterConfig())
    prompts = evaluation_prompts(HeldOut(src.held_out), args.prompts_per_task, seed=0)
    plan = {split: repeat(prompts[split], args.images_per_prompt) for split in ("seen", "held_out")}
    count = sum(map(len, plan.values()))
    print(f"{len(captions)} scenes, {count} images per score ({args.images_per_prompt} per prompt)", flush=True)
    results = {}
    for name, spec in recipes.items():
        cfg = load_recipe(spec, repo)
        tokenizer = train_tokenizer(captions, cfg.train.text.vocab_size, cfg.train.text.max_length)
        curves = []
        for seed in args.seed_list:
            args.seed_noise = 10_000  # the same noise for every recipe and seed
            trainer = TextTrainer(cfg, tokenizer, seed)
            feed = batches(images, trained_on, trainer.micro_batch, seed)
            print(f"{name} (seed {seed}): {spec}, {trainer.parameters / 1e6:.2f} M parameters", flush=True)
            curves.append(race(trainer, name, feed, yardstick, plan, args))
        results[name] = {
            "spec": spec,
            "cpu_s": curves[0][-1]["cpu_s"],
            "steps": int(np.mean([c[-1]["steps"] for c in curves])),
            "curves": curves,
            "summary": summarise([c[-1] for c in curves]),
        }
    plot(results, out_dir / "quality-text.png")
    result = {
        "machine": machine(),
        "resolution_px": RESOLUTION_PX,
        "scenes": len(captions),
        "held_out": list(src.held_out),
        "shuffled_captions": bool(args.shuffled_captions),
        "cpu_seconds_per_recipe": args.cpu_seconds,
        "seed_set": args.seed_set,
        "seeds": args.seed_list,
        "images_per_score": count,
        "sample_steps": args.sample_steps,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "plot": str(out_dir / "quality-text.png"),
        "recipes": results,
        "versus": time_to_target(results, args.versus or next(iter(results))),
    }
    (out_dir / "quality-text.json").write_text(json.dumps(result, indent=1))
    text = table(results) + "\n\n" + target_lines(result["versus"]) + f"\n\nplot: {out_dir / 'quality-text.png'}"
    return publish(result, text, args.out)

"""`sfumato bench quality`: time-to-quality at equal CPU time, in one run, on two datasets (the
pilot's shapes and CIFAR-10).

Three trainers get the same CPU seconds, the same denoiser (unet-xs's UNet2DModel, 2.7 M
parameters), the same 32 px training images in the same batches (the pilot's 32 px micro-batch):

  plain         the loop most tutorials start from (diffusers' train_unconditional example),
                made class-conditional and nothing else: DDPMScheduler (linear betas, 1,000
                steps), epsilon MSE, Adam at 1e-4, no EMA, no Min-SNR, no warmup. It trains no
                condition dropout, so it samples unguided: DDIM, 50 steps.
  sfumato-ddpm  configs/pilot.yaml's recipe with `diffusion.objective: ddpm`: v-prediction on
                the cosine schedule, Min-SNR-5, condition dropout 0.1, AdamW at the pilot's LR
                with its warmup, EMA with its half-life in images; DPM-Solver++, 25 steps,
                guidance as the pilot's evaluate (2 network calls a step: 50 calls, as plain's).
  sfumato-flow  the pilot's recipe as shipped: rectified flow, logit-normal times; flow-euler,
                25 steps, the same guidance.

A plain loop with switches is the competent baseline (issue 36): `plain+lr1e-3+cfg+ema` is the
tutorial loop at lr 1e-3, with condition dropout and the pilot's guidance at sampling (25 DDIM
steps x 2 calls), and an EMA of its weights at the pilot's half-life: sweep its lr on a tuning
seed, then race the best against sfumato's recipes on fresh ones.

`--recipe NAME=configs/x.yaml[,key=value...]` adds a trainer (name it in `--trainers`) with any
config's recipe and model, e.g. sfumato's DiT (`train.model=dit-xs`) with token routing or patch
masking (`train.routing={ratio: 0.5}`, `train.masking={ratio: 0.5}`): issue 35's race.

The sfumato trainers run sfumato's own `train_step`, loss, LR schedule and EMA, with `PlainEngine`
standing in for DeepSpeed (`sfumato bench train` measures what Ray + DeepSpeed cost on top).
One curriculum-free stage at 32 px for all three, so only the recipe differs.

The clock is the process's CPU time (every thread) spent in training steps; scoring is off the
clock. Run it on an otherwise idle machine: under contention torch's OpenMP threads spin while
they wait, which counts as CPU time without training (the table's steps per CPU-second show it:
the three trainers' step costs are within a few per cent of each other). At every
`--score-every` CPU seconds each trainer's weights (the EMA for sfumato) generate `--samples`
images, the same classes and noise seeds every time, which the offline yardstick
(sfumato.evaluate.domain, trained once per dataset on 80 % of it, scored against the other
20 %) scores: class accuracy and FD-domain. Target (issue 14): each sfumato trainer reaches
plain's final score in at most half of plain's time.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sfumato.bench import add_datasets_argument, add_out_argument, add_repo_argument, checkout, load_recipe, publish
from sfumato.bench.clock import on_the_clock

TRAINERS = ("plain", "sfumato-ddpm", "sfumato-flow")
# Recipes are chosen on tuning seeds and reported on fresh ones (issue 36): two disjoint ranges, so
# a figure's seeds say which it is. `--seed-set` picks one; a seed outside it is refused.
SEED_SETS = {"tuning": range(100, 200), "fresh": range(200, 300)}
DATASETS = ("shapes", "cifar10")
RESOLUTION_PX = 32
MODEL = "unet-xs"
SAMPLING_CALLS = 50  # network evaluations per image for every trainer


# ------------------------------------------------------------------------------------ data
@dataclass
class Dataset:
    name: str
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]


def shapes(num_images: int, seed: int = 0) -> Dataset:
    """The pilot's demo shapes (drawn at its 96 px, resized as its shards are to 32 px)."""
    from sfumato.data.decode import render
    from sfumato.data.demo import SHAPES, draw_sample

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(num_images):
        img, _, shape = draw_sample(rng, 96)
        images.append(np.asarray(render(img, RESOLUTION_PX, "center_crop")))
        labels.append(SHAPES.index(shape))
    return Dataset("shapes", np.stack(images), np.array(labels, np.int64), list(SHAPES))


def _cifar_files(source: Path, per_class: int):
    """(class, name, bytes) of the first `per_class` images of each class: from the folder holding
    cifar10-train.tar.gz (train/<class>/NNNN.jpg, archive order), else from a folder of class
    folders (<class>/*.jpg, name order; the tests' fixture set)."""
    taken: dict[str, int] = {}
    archive = source / "cifar10-train.tar.gz"
    if archive.exists():
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or not member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                if taken.setdefault(parts[-2], 0) < per_class:
                    taken[parts[-2]] += 1
                    yield parts[-2], member.name, tar.extractfile(member).read()
    elif source.is_dir() and any(source.glob("*/*.jpg")):
        for path in sorted(source.glob("*/*.jpg")):
            if taken.setdefault(path.parent.name, 0) < per_class:
                taken[path.parent.name] += 1
                yield path.parent.name, str(path), path.read_bytes()
    else:
        raise FileNotFoundError(f"{archive} does not exist: pass --datasets with the folder holding it")


def cifar10(source: Path, per_class: int) -> Dataset:
    """The first `per_class` images of each class of CIFAR-10's JPEGs, decoded in memory: `source`
    holds ../shared/datasets/cifar10-train.tar.gz, or is a folder of class folders."""
    by_class: dict[str, list[np.ndarray]] = {}
    for cls, name, data in _cifar_files(Path(source), per_class):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (RESOLUTION_PX, RESOLUTION_PX):
            raise ValueError(f"{source}:{name} is {image.size}, CIFAR-10 images are 32x32")
        by_class.setdefault(cls, []).append(np.asarray(image))
    names = sorted(by_class)
    if len(names) < 2:
        raise ValueError(f"{source} holds {len(names)} CIFAR-10 class folders: expected 10")
    labels = np.concatenate([np.full(len(by_class[n]), i, np.int64) for i, n in enumerate(names)])
    return Dataset("cifar10", np.concatenate([np.stack(by_class[n]) for n in names]), labels, names)


def split(data: Dataset, holdout_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) by a seeded permutation: the trainers never see the held-out images,
    which are the yardstick's reference (and its classifier's test set)."""
    order = np.random.default_rng(seed).permutation(len(data.labels))
    cut = round(len(order) * holdout_fraction)
    pick = lambda idx: Dataset(data.name, data.images[idx], data.labels[idx], data.class_names)  # noqa: E731
    return pick(order[cut:]), pick(order[:cut])


def batches(data: Dataset, batch_size: int, seed: int):
    """Endless seeded epochs of {"image", "class", "id"} micro-batches (the shard loader's form)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(data.labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {"image": data.images[idx], "class": data.labels[idx], "id": [str(i) for i in idx]}


# -------------------------------------------------------------------------------- trainers
def to_model_range(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.from_numpy(np.ascontiguousarray(batch["image"])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x0, torch.from_numpy(np.asarray(batch["class"], np.int64))


@dataclass(frozen=True)
class PlainSettings:
    """What a plain loop adds to the tutorial's, each a switch (a trainer name spells them:
    `plain+lr1e-3+cfg+ema`): the learning rate, condition dropout with guidance at sampling
    (`cfg`: 10 % of labels dropped to a null class; DDIM 25 steps x 2 calls at `guidance`), an
    EMA of the weights (`ema`: the pilot's half-life in images)."""

    lr: float = 1e-4
    cfg: bool = False
    ema: bool = False
    dropout: float = 0.1
    guidance: float = 3.0  # configs/pilot.yaml's evaluate.guidance_scale
    halflife_samples: float = 3000  # configs/pilot.yaml's train.ema.halflife_samples

    @classmethod
    def parse(cls, name: str, **defaults) -> PlainSettings:
        """`plain` (the tutorial), `plain+lr3e-4`, `plain+lr1e-3+cfg+ema`, ... in any order."""
        settings = cls(**defaults)
        head, *parts = name.split("+")
        if head != "plain":
            raise ValueError(f"{name!r}: a plain trainer's name starts with 'plain'")
        for part in parts:
            if part in ("cfg", "ema"):
                settings = replace(settings, **{part: True})
            elif part.startswith("lr"):
                try:
                    settings = replace(settings, lr=float(part[2:]))
                except ValueError:
                    raise ValueError(f"{name!r}: {part!r} is not lr<number> (e.g. lr3e-4)") from None
            else:
                raise ValueError(f"{name!r}: unknown switch {part!r}; plain takes lr<number>, cfg, ema")
        return settings


class PlainTrainer:
    """(a): diffusers' tutorial loop, class labels added to the UNet and nothing else; with
    PlainSettings, the competent baseline: its learning rate tuned, condition dropout and
    guidance, EMA, each a switch (sfumato's other levers are not in it)."""

    def __init__(self, num_classes: int, seed: int, settings: PlainSettings | None = None, micro_batch: int = 32):
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        from sfumato.models.registry import MODELS

        self.settings = s = settings or PlainSettings()
        torch.manual_seed(seed)
        template = MODELS[MODEL](RESOLUTION_PX, 3, num_classes)
        # with condition dropout, one more class embedding: the null class (index num_classes)
        self.null_class = num_classes if s.cfg else None
        self.model = UNet2DModel.from_config({**template.config, "num_class_embeds": num_classes + int(s.cfg)})
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)  # linear betas, epsilon: diffusers' defaults
        self.sampler = DDIMScheduler.from_config(self.scheduler.config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.averaged = None
        if s.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            beta = 0.5 ** (micro_batch / s.halflife_samples)
            self.averaged = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(beta))

    def step(self, batch: dict) -> float:
        x0, classes = to_model_range(batch)
        if self.null_class is not None:
            dropped = torch.rand(len(classes), generator=self.generator) < self.settings.dropout
            classes = torch.where(dropped, self.null_class, classes)
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=self.generator)
        prediction = self.model(self.scheduler.add_noise(x0, noise, t), t, class_labels=classes).sample
        loss = F.mse_loss(prediction, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        return loss.item()

    @torch.no_grad()
    def generate(self, labels: np.ndarray, seed: int) -> torch.Tensor:
        """float NCHW in [-1, 1]; image i starts from the noise of seed + i (as sfumato's sampler).
        SAMPLING_CALLS network calls an image: 50 DDIM steps, or 25 guided ones of 2 calls."""
        from diffusers.utils.torch_utils import randn_tensor

        from sfumato.diffusion.sample import generators

        model = self.model if self.averaged is None else self.averaged.module
        model.eval()
        x = randn_tensor((len(labels), 3, RESOLUTION_PX, RESOLUTION_PX), generator=generators(seed, 0, len(labels)))
        classes = torch.from_numpy(np.asarray(labels, np.int64))
        guided = self.null_class is not None
        self.sampler.set_timesteps(SAMPLING_CALLS // 2 if guided else SAMPLING_CALLS)
        for t in self.sampler.timesteps:
            if guided:
                both = model(
                    torch.cat([x, x]), t, class_labels=torch.cat([classes, torch.full_like(classes, self.null_class)])
                )
                conditional, unconditional = both.sample.chunk(2)
                eps = unconditional + self.settings.guidance * (conditional - unconditional)
            else:
                eps = model(x, t, class_labels=classes).sample
            x = self.sampler.step(eps, t, x).prev_sample
        model.train()
        return x.clamp(-1, 1)


class SfumatoTrainer:
    """(b) and (c): the pilot's recipe through sfumato's train_step, LR schedule and EMA."""

    def __init__(self, cfg, num_classes: int, class_names: list[str], micro_batch: int, total_steps: int, seed: int):
        from sfumato.diffusion.schedule import NoiseSchedule
        from sfumato.models.registry import build_denoiser, empty_like
        from sfumato.models.repa import attach
        from sfumato.models.run import training_levers
        from sfumato.train.ema import EMA, ema_beta
        from sfumato.train.step import PlainEngine, TrainState

        self.cfg, self.class_names, self.total_steps = cfg, class_names, total_steps
        torch.manual_seed(seed)
        model = build_denoiser(cfg.train.model, RESOLUTION_PX, 3, num_classes)
        training_levers(model, cfg.train)
        repa = None if cfg.train.repa is None else attach(model, cfg.train.repa)
        self.progress = 0.0  # the share of the CPU budget spent (bench.clock sets it)
        t = cfg.train
        self.state = TrainState(
            engine=PlainEngine(model, t.optimizer, grad_clip_norm=t.grad_clip_norm),
            schedule=NoiseSchedule.from_config(cfg.diffusion),
            diffusion_cfg=cfg.diffusion,
            generator=torch.Generator().manual_seed(seed),
            device=torch.device("cpu"),
            null_class=num_classes,
            repa=repa,
        )
        self.ema = EMA(model, ema_beta(t.ema.decay, t.ema.halflife_samples, micro_batch, micro_batch))
        self.ema_model = empty_like(model)

    def step(self, batch: dict) -> float:
        from sfumato.models.run import training_levers
        from sfumato.train.step import lr_at, train_step

        if self.cfg.train.masking is not None:  # masked until the budget's last unmasked_fraction
            training_levers(self.state.engine.module, self.cfg.train, self.progress)
        self.state.engine.set_lr(lr_at(self.state.step, self.cfg.train.optimizer, self.total_steps))
        out = train_step(self.state, batch)
        self.ema.update(self.state.engine.module)
        return float(out["loss"])

    @torch.no_grad()
    def generate(self, labels: np.ndarray, seed: int) -> torch.Tensor:
        from sfumato.diffusion.pipeline import SfumatoPipeline
        from sfumato.diffusion.sample import make_sampler, sample

        e = self.cfg.evaluate
        self.ema.copy_to(self.ema_model)
        self.ema_model.eval()
        pipe = SfumatoPipeline(
            unet=self.ema_model.net,
            scheduler=make_sampler(self.cfg.diffusion, e.sampler, RESOLUTION_PX),
            class_names=self.class_names,
        )
        pipe.set_progress_bar_config(disable=True)
        images = sample(pipe, len(labels), seed, SAMPLING_CALLS // 2, e.guidance_scale, conditions=list(labels))
        return images * 2 - 1


def recipe(objective: str, repo: Path):
    """configs/pilot.yaml with the given objective (its sampler follows the objective)."""
    from sfumato.config import load_config

    return load_config(repo / "configs" / "pilot.yaml", [f"diffusion.objective={objective}"], inputs=False)


# --------------------------------------------------------------------------------- the race
@dataclass
class Curve:
    trainer: str
    points: list[dict] = field(default_factory=list)  # cpu_s, steps, loss, class_accuracy, fd_domain, wall_s
    note: str = ""


def race(trainer, name: str, train: Dataset, yardstick, args) -> tuple[Curve, torch.Tensor]:
    """Train `trainer` for args.cpu_seconds of CPU time, scoring every args.score_every."""
    from sfumato.evaluate.domain import score

    labels = np.arange(args.samples) % len(train.class_names)
    last = {}

    def judge(point: dict) -> dict:
        last["images"] = images = trainer.generate(labels, args.seed)
        result = score(yardstick, images, labels)
        point |= {
            "class_accuracy": round(result["class_accuracy"], 4),
            "fd_domain": round(result["fd_domain"], 2),
            # beside a real sample of the same size (sfumato.evaluate.memorisation)
            "fd_domain_floor": round(result["fd_domain_floor"], 2),
            "coverage": round(result["coverage"], 3),
            "coverage_real": round(result["coverage_real"], 3),
            "closer_than_real": round(result["memorisation"]["closer_than_real"], 3),
            "copies": round(result["memorisation"]["copies"], 3),
        }
        print(
            f"  {train.name:8s} {name:13s} {point['cpu_s']:7.0f} CPU-s {point['steps']:5d} steps  "
            f"loss {point['loss']:.4f}  "
            f"class accuracy {result['class_accuracy']:.3f}  FD-domain {result['fd_domain']:.1f} "
            f"(real {point['fd_domain_floor']:.1f})  coverage {point['coverage']:.2f} "
            f"(real {point['coverage_real']:.2f})  copies {point['copies']:.2f}",
            flush=True,
        )
        return point

    feed = batches(train, args.micro_batch, args.seed)
    points = on_the_clock(trainer, feed, args.cpu_seconds, args.score_every, judge)
    return Curve(name, points), last["images"]


def first_reaching(curve: Curve, key: str, target: float) -> float | None:
    """CPU seconds of the first score at least as good as `target` (accuracy up, FD down)."""
    for p in curve.points:
        if (p[key] >= target) if key == "class_accuracy" else (p[key] <= target):
            return p["cpu_s"]
    return None


def run_dataset(data: Dataset, args, repo: Path, out_dir: Path) -> dict:
    from sfumato.config import DomainConfig
    from sfumato.diffusion.sample import to_grid
    from sfumato.evaluate.domain import build_yardstick, train_classifier

    train, heldout = split(data, 0.2, args.seed)
    settings = DomainConfig(seed=args.seed)
    classifier = train_classifier(train.images, train.labels, data.class_names, settings)
    yardstick = build_yardstick(
        classifier, heldout.images, heldout.labels, f"bench-{data.name}", settings, train_images=train.images
    )
    print(
        f"{data.name}: {len(train.labels)} training images, {len(heldout.labels)} held out, "
        f"yardstick accuracy real {yardstick.real_accuracy:.3f}, noise {yardstick.noise_accuracy:.3f}",
        flush=True,
    )
    # Steps the sfumato LR schedule is laid out over: a constant LR after warmup (the pilot's)
    # does not depend on it; a cosine one would end at the budget's estimated step count.
    estimated_steps = 10**6
    curves, grids = {}, {}
    for name in args.trainers:
        if name.split("+")[0] == "plain":
            trainer = PlainTrainer(len(data.class_names), args.seed, PlainSettings.parse(name), args.micro_batch)
        else:
            cfg = load_recipe(args.recipes_by_name[name], repo) if name in args.recipes_by_name else None
            cfg = cfg or recipe(name.removeprefix("sfumato-"), repo)
            trainer = SfumatoTrainer(
                cfg, len(data.class_names), data.class_names, args.micro_batch, estimated_steps, args.seed
            )
        curves[name], images = race(trainer, name, train, yardstick, args)
        grid_path = out_dir / f"{data.name}-{name}.png"
        columns = len(data.class_names)  # image i was asked for class i % columns: a column per class
        shown = images[: columns * max(1, min(8, len(images) // columns))]
        to_grid(((shown + 1) / 2).clamp(0, 1), columns=columns).save(grid_path)
        grids[name] = str(grid_path)
    result = {
        "train_images": len(train.labels),
        "heldout_images": len(heldout.labels),
        "classes": data.class_names,
        "real_accuracy": yardstick.real_accuracy,
        "noise_accuracy": yardstick.noise_accuracy,
        "noise_fd_domain": yardstick.noise_fd_domain,
        "curves": {k: c.points for k, c in curves.items()},
        "grids": grids,
    }
    reference = args.versus or "plain"
    if reference in curves:  # time to target: when each trainer first reaches the reference's final score
        final, budget = curves[reference].points[-1], curves[reference].points[-1]["cpu_s"]
        result["versus"] = {
            "reference": reference,
            "trainers": {
                name: {
                    key: {
                        "reference_final": final[key],
                        "cpu_s": (s := first_reaching(curves[name], key, final[key])),
                        "share_of_reference_time": None if s is None else round(s / budget, 3),
                    }
                    for key in ("class_accuracy", "fd_domain")
                }
                for name in curves
                if name != reference
            },
        }
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for column, dataset in enumerate(names):
        r = results[dataset]
        for row, (key, label) in enumerate((("class_accuracy", "class accuracy"), ("fd_domain", "FD-domain"))):
            ax = axes[row][column]
            for trainer, points in r["curves"].items():
                ax.plot([p["cpu_s"] for p in points], [p[key] for p in points], marker="o", label=trainer)
            if key == "class_accuracy":
                ax.axhline(r["real_accuracy"], ls="--", c="grey", lw=1, label="real images")
                ax.axhline(r["noise_accuracy"], ls=":", c="grey", lw=1, label="noise")
            else:
                ax.set_yscale("log")
            ax.set_title(f"{dataset}: {label}")
            ax.set_xlabel("training CPU seconds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure(point: dict, key: str, spec: str) -> str:
    """A point's figure, or a dash in results written before it was measured."""
    return "—" if point.get(key) is None else format(point[key], spec)


def table(results: dict) -> str:
    reference = next((r["versus"]["reference"] for r in results.values() if "versus" in r), "plain")
    lines = [
        f"| dataset | trainer | CPU-s | steps | class accuracy | FD-domain | coverage | copies | "
        f"reaches {reference}'s final accuracy at | reaches {reference}'s final FD at |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, r in results.items():
        for trainer, points in r["curves"].items():
            final = points[-1]
            versus = r.get("versus", {}).get("trainers", {}).get(trainer, {})

            def when(key, versus=versus):
                v = versus.get(key)
                if v is None:
                    return "—"
                return (
                    "not reached"
                    if v["cpu_s"] is None
                    else f"{v['cpu_s']:.0f} s ({v['share_of_reference_time']:.2f} of {reference}'s)"
                )

            lines.append(
                f"| {dataset} | {trainer} | {final['cpu_s']:.0f} | {final['steps']} | {final['class_accuracy']:.3f} | "
                f"{final['fd_domain']:.1f} | {_figure(final, 'coverage', '.2f')} | {_figure(final, 'copies', '.2f')} | "
                f"{when('class_accuracy')} | {when('fd_domain')} |"
            )
        final = next(iter(r["curves"].values()))[-1]
        lines.append(
            f"| {dataset} | real images / noise | | | {r['real_accuracy']:.3f} / {r['noise_accuracy']:.3f} | "
            f"{_figure(final, 'fd_domain_floor', '.1f')} / {r['noise_fd_domain']:.0f} | "
            f"{_figure(final, 'coverage_real', '.2f')} / 0 | | | |"
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--cpu-seconds", type=float, default=600.0, help="training CPU time per trainer")
    parser.add_argument("--score-every", type=float, default=100.0, help="CPU seconds between scores")
    parser.add_argument("--samples", type=int, default=160, help="generated images per score")
    parser.add_argument(
        "--trainers",
        default="plain,sfumato-ddpm,sfumato-flow",
        help="which trainers race: plain (the tutorial loop), a plain loop with switches (plain+lr1e-3+cfg+ema: "
        "its lr, condition dropout with guidance, EMA), sfumato-ddpm, sfumato-flow, or a --recipe's name",
    )
    parser.add_argument("--quality-datasets", default="shapes,cifar10", help="shapes and/or cifar10")
    parser.add_argument("--shapes-images", type=int, default=2000, help="demo shapes drawn (the pilot's count)")
    parser.add_argument("--cifar-per-class", type=int, default=500, help="CIFAR-10 images per class")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="data split, batches, weights and noise")
    parser.add_argument("--out-dir", default=None, help="plot, grids and quality.json (default runs/bench-quality)")
    parser.add_argument(
        "--versus",
        default=None,
        help="the trainer or recipe whose final score the others' time to target is measured against "
        "(default: plain; --text: the first recipe)",
    )
    text = parser.add_argument_group("--text: recipes on the compositional world (sfumato.bench.quality_text)")
    text.add_argument("--text", action="store_true", help="race text-to-image recipes, scored per GenEval task")
    parser.add_argument(
        "--recipe",
        action="append",
        help="NAME=configs/x.yaml[,key=value...] (repeatable): a recipe to race (class: name it in --trainers)",
    )
    text.add_argument("--recipes", default=None, help="comma-separated recipe names to race (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per recipe: mean and spread of the finals")
    parser.add_argument("--first-seed", type=int, default=None, help="the first of the seeds (default: --seed)")
    parser.add_argument(
        "--seed-set",
        choices=sorted(SEED_SETS),
        default=None,
        help="tuning (seeds 100-199: choose recipes here) or fresh (200-299: report them here); "
        "the first seed defaults to the set's first and a seed outside it is refused",
    )
    text.add_argument("--prompts-per-task", type=int, default=8, help="evaluation prompts per task and split")
    text.add_argument("--images-per-prompt", type=int, default=2, help="images per prompt per score")
    text.add_argument("--sample-steps", type=int, default=25, help="sampler steps per image")
    text.add_argument(
        "--shuffled-captions",
        action="store_true",
        help="train on the captions permuted across the scenes (the floor: a model that cannot learn its prompts)",
    )
    text.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="join the quality-text.json of races run as separate processes into one table (no training)",
    )
    text.add_argument("--scene-images", type=int, default=0, help="scenes drawn (0: configs/pilot-text.yaml's)")
    add_datasets_argument(parser, "cifar10-train.tar.gz")
    add_repo_argument(parser, "configs/pilot.yaml, the recipe the sfumato trainers train")
    add_out_argument(parser)


def _plain(name: str) -> bool:
    """A plain loop's name with valid switches (PlainSettings.parse)."""
    try:
        PlainSettings.parse(name)
    except ValueError:
        return False
    return True


def seeds(args) -> list[int]:
    """The race's seeds: --seeds of them from --first-seed (else the seed set's first, else
    --seed), all inside --seed-set when one is named."""
    first = args.first_seed
    if first is None:
        first = SEED_SETS[args.seed_set].start if args.seed_set else args.seed
    chosen = list(range(first, first + args.seeds))
    if args.seed_set and not set(chosen) <= set(SEED_SETS[args.seed_set]):
        allowed = SEED_SETS[args.seed_set]
        raise SystemExit(
            f"--seed-set {args.seed_set} is seeds {allowed.start}-{allowed.stop - 1}; "
            f"seeds {chosen[0]}-{chosen[-1]} are not all in it"
        )
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    return chosen


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "seeds": list(values),
    }


def summarise(by_seed: dict[int, dict]) -> dict:
    """Per dataset and trainer, the final class accuracy, FD-domain and steps over seeds."""
    first = next(iter(by_seed.values()))
    return {
        dataset: {
            trainer: {
                key: spread([by_seed[s][dataset]["curves"][trainer][-1][key] for s in by_seed])
                for key in ("class_accuracy", "fd_domain", "steps")
            }
            for trainer in first[dataset]["curves"]
        }
        for dataset in first
    }


def run(args) -> dict:
    from sfumato.bench.ingest import machine

    args.seed_list = seeds(args)
    if args.text:
        from sfumato.bench.quality_text import run_text

        return run_text(args)

    repo = checkout(args.repo, "configs/pilot.yaml")
    out_dir = Path(args.out_dir or "runs/bench-quality")
    out_dir.mkdir(parents=True, exist_ok=True)
    args.trainers = [t.strip() for t in args.trainers.split(",")]
    args.recipes_by_name = dict(spec.split("=", 1) for spec in args.recipe or [])
    unknown = [t for t in args.trainers if t not in TRAINERS and t not in args.recipes_by_name and not _plain(t)]
    if unknown:
        raise SystemExit(
            f"--trainers: unknown {unknown}; choose from {TRAINERS}, a plain loop with switches "
            "(plain+lr1e-3+cfg+ema) or name a --recipe"
        )
    wanted = [d.strip() for d in args.quality_datasets.split(",")]
    if set(wanted) - set(DATASETS):
        raise SystemExit(f"--quality-datasets: unknown {sorted(set(wanted) - set(DATASETS))}; choose from {DATASETS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.micro_batch = recipe("flow", repo).train.stages[-1].micro_batch_size
    started = time.perf_counter()
    by_seed = {}
    for seed in args.seed_list:
        args.seed = seed
        seed_dir = out_dir if len(args.seed_list) == 1 else out_dir / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        by_seed[seed] = {}
        for name in wanted:
            data = (
                shapes(args.shapes_images, seed)
                if name == "shapes"
                else cifar10(Path(args.datasets), args.cifar_per_class)
            )
            by_seed[seed][name] = run_dataset(data, args, repo, seed_dir)
        plot(by_seed[seed], seed_dir / "quality.png")
    results = by_seed[args.seed_list[0]]
    result = {
        "machine": machine(),
        "model": {
            n: load_recipe(args.recipes_by_name[n], repo).train.model if n in args.recipes_by_name else MODEL
            for n in args.trainers
        },
        "resolution_px": RESOLUTION_PX,
        "micro_batch": args.micro_batch,
        "cpu_seconds_per_trainer": args.cpu_seconds,
        "samples_per_score": args.samples,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "plot": str(out_dir / "quality.png"),
        "seed_set": args.seed_set,
        "seeds": args.seed_list,
        "datasets": results,  # the first seed's (all of one seed: curves, time to target)
    }
    text = "\n" + table(results) + f"\n\nplot: {out_dir / 'quality.png'}"
    if len(args.seed_list) > 1:
        result["by_seed"] = {str(s): r for s, r in by_seed.items()}
        result["summary"] = summarise(by_seed)
        result["plot"] = str(out_dir / f"seed-{args.seed_list[0]}" / "quality.png")
        text = "\n" + seed_table(result["summary"], args.seed_list, args.seed_set)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
    return publish(result, text, args.out)


def seed_table(summary: dict, seed_list: list[int], seed_set: str | None) -> str:
    """The finals as mean ± std over seeds, with the per-seed figures."""
    which = f" ({seed_set} seeds)" if seed_set else ""
    lines = [
        f"Final scores over seeds {seed_list[0]}-{seed_list[-1]}{which}: mean ± std (per seed)",
        "",
        "| dataset | trainer | steps | class accuracy | FD-domain |",
        "|---|---|---:|---|---|",
    ]
    for dataset, trainers in summary.items():
        for trainer, f in trainers.items():
            acc, fd = f["class_accuracy"], f["fd_domain"]
            lines.append(
                f"| {dataset} | {trainer} | {f['steps']['mean']:.0f} | "
                f"{acc['mean']:.3f} ± {acc['std']:.3f} ({', '.join(f'{v:.3f}' for v in acc['seeds'])}) | "
                f"{fd['mean']:.1f} ± {fd['std']:.1f} ({', '.join(f'{v:.1f}' for v in fd['seeds'])}) |"
            )
    return "\n".join(lines)

"""The compositional yardstick: GenEval's six tasks judged offline on the demo's scenes (issue 34).

API (what evaluate, the bench and a training script call):

    yardstick = load_or_train_segmenter(resolution_px, cache_dir, SegmenterConfig())  # -> Yardstick
    result = yardstick.score(images, prompts)      # images: uint8 NHWC or float NCHW in [-1, 1];
                                                   # prompts: one sfumato.data.scenes.Prompt per image
    result.tasks      # {"single_object": 0.97, ...}: per-task accuracy (tasks present only)
    result.overall    # the mean of the task accuracies (GenEval's overall score)
    result.correct    # bool per image; result.judgements[i].reason says why one is wrong
    result.to_json()  # {"overall", "tasks", "images", "prompts"}
    validate(yardstick, evaluation_prompts(HeldOut([...]), 8), images_per_prompt=4)
                      # real / degraded / shuffled-prompt / noise figures per split

GenEval (Ghosh et al. 2023) asks a text-to-image model for single objects, two objects, counts,
colours, positions and colour bindings, detects objects in its images and checks each prompt's
rules. Its detector (Mask2Former on COCO) and colour classifier (CLIP) need downloads, and its
classes are COCO's. The demo's world (sfumato.data.scenes) replaces both with a judge that can be
trained here in a minute: a small fully convolutional segmenter with two per-pixel heads, shape
(background + 4 shapes) and colour (background + 6 colours), trained on freshly rendered scenes
of every combination (held-out ones too: it is the judge, not the model under test) at the run's
resolution. The rendering is exact, so the targets are; augmentation (supersampling or hard
edges, blur, Gaussian and low-frequency noise, brightness, contrast and per-channel colour jitter,
tinted backgrounds, small shifts, objects 15 % smaller or larger) makes it read generated
images, which are never flat, and a few noise images with no object teach it that noise holds
nothing.

Detection: the connected regions of foreground (shape head's background probability < 0.5,
4-connected, scipy.ndimage.label), regions under `min_object_fraction` of the image dropped; each
region's shape and colour are the classes of largest summed probability over its pixels, its box
the region's extent; regions are ranked by area (GenEval ranks by detector confidence).

Judging follows GenEval's evaluate_images.py: each prompt becomes `include` requirements (a shape,
a count, optionally a colour and a position relative to an earlier requirement's objects) and,
for counting, an `exclude` (count + 1 of the shape means wrong). Only the first `count` objects of
a shape are checked for colour and position; a position holds when GenEval's relative_position
(box centres, offsets shrunk by POSITION_THRESHOLD x the two boxes' sizes, direction cosine
above 0.5) includes it. As in GenEval, single_object, two_object, counting and position judge
shapes only (their prompts' colours are not checked); colors and color_attr judge colours too.

Scoring: per image correct or not; per task the share of its images correct; overall the mean of
the task accuracies, per split (seen, held_out). A segmenter is trained once per resolution,
VERSION and settings, cached as safetensors under data.output_dir/segmenter/<fingerprint>/.
Validation (`validate`, `sfumato bench compositional`, BENCHMARKS.md): rendered images of the
evaluation prompts score near 1, noise 0, the same images against another prompt of their task low.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sfumato.config import SegmenterConfig, content_hash
from sfumato.data import scenes
from sfumato.data.scenes import COLOURS, SHAPES, TASKS, Prompt, Thing
from sfumato.layout import atomic_write_json, commit_file, temporary_sibling

log = logging.getLogger(__name__)

VERSION = 1  # of the network, its training data and augmentation: part of the fingerprint
WEIGHTS, META = "segmenter.safetensors", "meta.json"
SHAPE_CLASSES = ("background", *SHAPES)
COLOUR_CLASSES = ("background", *COLOURS)
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by 0.1 x the sum of the two boxes' sizes
MIN_OBJECT_FRACTION = 0.006
BATCH = 256  # images per forward pass when scoring


# ------------------------------------------------------------------------------------ network
def _block(channels_in: int, channels_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.SiLU(),
    )


class SegmenterNet(nn.Module):
    """A small U-Net: a 3x3 block at full resolution (`width` channels), two at 1/2 (2 x width),
    four at 1/4 (4 x width; dilations 1, 1, 2, 4 give a receptive field of about 70 px, the whole
    image at 32-48 px, which a shape's class needs), decoded back by a 3x3 block at each
    resolution over the upsampled features and the skip, then per-pixel shape and colour logits."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.at_full = _block(3, w)
        self.at_half = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.at_quarter = nn.Sequential(
            _block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w), _block(4 * w, 4 * w, dilation=2)
        )
        self.context = _block(4 * w, 4 * w, dilation=4)
        self.up_half = _block(6 * w, 2 * w)
        self.up_full = _block(3 * w, w)
        self.shape_head = nn.Conv2d(w, len(SHAPE_CLASSES), 1)
        self.colour_head = nn.Conv2d(w, len(COLOUR_CLASSES), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.at_full(x)
        half = self.at_half(full)
        quarter = self.context(self.at_quarter(half))
        half = self.up_half(torch.cat([F.interpolate(quarter, size=half.shape[-2:], mode="bilinear"), half], 1))
        full = self.up_full(torch.cat([F.interpolate(half, size=full.shape[-2:], mode="bilinear"), full], 1))
        return self.shape_head(full), self.colour_head(full)


# ------------------------------------------------------------------------------ training data
def random_objects(rng: np.random.Generator) -> tuple[scenes.SceneObject, ...]:
    """1-4 objects of any shape and colour, laid out as the demo lays out a scene (one: in the
    middle, larger; more: in the 2 x 2 grid), each 15 % smaller or larger at most."""
    names = list(COLOURS)
    count = int(rng.integers(1, 5))
    things = tuple(
        Thing(SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.integers(len(names)))]) for _ in range(count)
    )
    objects = scenes.layout(Prompt("scene", "", things), rng)
    return tuple(dataclasses.replace(o, r=o.r * float(rng.uniform(0.85, 1.15))) for o in objects)


def training_scenes(count: int, resolution_px: int, noise_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(images uint8 [N, H, W, 3], shape targets int64 [N, H, W], colour targets [N, H, W]): random
    scenes drawn with 1, 2 or 4 x supersampling on a ground within 30 levels of the demo's grey,
    and `noise_fraction` of noise images whose targets are all background."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, resolution_px, resolution_px, 3), np.uint8)
    shape_maps = np.zeros((count, resolution_px, resolution_px), np.int64)
    colour_maps = np.zeros_like(shape_maps)
    for i in range(count):
        if rng.random() < noise_fraction:
            mean, spread = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5)
            noise = mean + spread * rng.standard_normal((resolution_px, resolution_px, 3))
            images[i] = np.round(np.clip(noise, 0, 1) * 255).astype(np.uint8)
            continue
        objects = random_objects(rng)
        ground = np.clip(np.array(scenes.BACKGROUND) + rng.integers(-30, 31, 3), 0, 255)
        supersample = int(rng.choice([1, 2, 4], p=[0.2, 0.3, 0.5]))
        images[i] = np.asarray(scenes.render(objects, resolution_px, supersample, tuple(int(v) for v in ground)))
        shape_maps[i], colour_maps[i] = scenes.label_maps(objects, resolution_px)
    return images, shape_maps, colour_maps


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred by its own sigma (pixels; 0: unchanged), a separable 5-tap kernel."""
    n, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [n, 5]; sigma ~0: a delta
    weight = kernel.repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.conv2d(
        F.pad(x.reshape(1, n * c, h, w), (2, 2, 0, 0), mode="replicate"), weight[:, None, None, :], groups=n * c
    )
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), weight[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """images float [N, 3, H, W] in [0, 1], targets int64 [N, 2, H, W] (shape, colour) -> the
    network's input in [-1, 1] and the targets shifted alike. A generated image is never a clean
    render: its edges are soft or ragged, its colours off, its flat areas mottled."""
    n, _, height, width = images.shape

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    pad = max(1, height // 16)  # a shift of up to 2 px at 32 px
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    padded_targets = F.pad(targets.float(), (pad,) * 4, mode="replicate").long()
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])
    y = torch.stack([padded_targets[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])
    blurred = torch.rand(n, generator=generator) < 0.5
    x = _gaussian_blur(x, torch.where(blurred, uniform(0.3, 1.0), torch.zeros(n)))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean + uniform(-0.08, 0.08, 1, 1, 1)
    x = x * uniform(0.9, 1.1, 3, 1, 1) + uniform(-0.04, 0.04, 3, 1, 1)
    mottle = torch.randn(n, 3, max(1, height // 4), max(1, width // 4), generator=generator)
    x = x + uniform(0.0, 0.05, 1, 1, 1) * F.interpolate(mottle, size=(height, width), mode="bilinear")
    x = x + uniform(0.0, 0.08, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1) * 2 - 1, y


def train_segmenter(resolution_px: int, settings: SegmenterConfig | None = None, device: str = "cpu") -> Yardstick:
    """A segmenter trained from nothing on `settings.scenes` rendered scenes. Deterministic for
    the same settings (initialisation, scenes, batch order and augmentation are seeded; the
    caller's torch RNG is left as it was)."""
    s = settings or SegmenterConfig()
    started = time.perf_counter()
    images, shape_maps, colour_maps = training_scenes(s.scenes, resolution_px, s.noise_fraction, s.seed)
    rendered_s = time.perf_counter() - started
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8: a quarter of float's memory
    targets = torch.from_numpy(np.stack([shape_maps, colour_maps], 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = SegmenterNet(s.width).to(device, memory_format=torch.channels_last)  # a third faster on CPU
    generator = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = math.ceil(len(x) / s.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch)
    net.train()
    for _ in range(s.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), s.batch_size):
            batch = order[start : start + s.batch_size]
            inputs, wanted = augment(x[batch].float() / 255, targets[batch], generator)
            shape_logits, colour_logits = net(inputs.to(device, memory_format=torch.channels_last))
            wanted = wanted.to(device)
            weight = 1 + (s.foreground_weight - 1) * (wanted[:, 0] > 0).float()
            loss = (F.cross_entropy(shape_logits, wanted[:, 0], reduction="none") * weight).mean() + (
                F.cross_entropy(colour_logits, wanted[:, 1], reduction="none") * weight
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    meta = {
        "version": VERSION,
        "scene_design": scenes.DESIGN,
        "settings": s.model_dump(mode="json"),
        "resolution_px": resolution_px,
        "render_seconds": round(rendered_s, 2),
        "train_seconds": round(time.perf_counter() - started, 2),
        "final_loss": round(loss.item(), 4),
    }
    log.info(
        "compositional segmenter: %d scenes at %d px, %d epochs in %.1f s",
        s.scenes,
        resolution_px,
        s.epochs,
        meta["train_seconds"],
    )
    return Yardstick(net, resolution_px, meta, device)


# ---------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detection:
    """One object found: its shape, colour, box (x0, y0, x1, y1 in pixels, ends exclusive) and area."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]
    area_px: int


def detect(shape_probs: np.ndarray, colour_probs: np.ndarray, min_area_px: float) -> list[Detection]:
    """One image's objects from its per-pixel probabilities ([5, H, W] and [7, H, W]), largest first."""
    from scipy import ndimage

    regions, count = ndimage.label(shape_probs[0] < 0.5)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(regions), regions, index)
    shape_mass = np.stack([ndimage.sum_labels(p, regions, index) for p in shape_probs[1:]], -1)
    colour_mass = np.stack([ndimage.sum_labels(p, regions, index) for p in colour_probs[1:]], -1)
    found = []
    for k, where in enumerate(ndimage.find_objects(regions)):
        if areas[k] < min_area_px:
            continue
        box = (where[1].start, where[0].start, where[1].stop, where[0].stop)
        found.append(
            Detection(SHAPES[shape_mass[k].argmax()], list(COLOURS)[colour_mass[k].argmax()], box, int(areas[k]))
        )
    return sorted(found, key=lambda d: -d.area_px)


# ------------------------------------------------------------------------------------ judging
@dataclass(frozen=True)
class Requirement:
    """GenEval's `include` entry: at least `count` objects of `shape`; the first `count` of them
    `colour` (when given) and each `relation` of every object of requirement `target`."""

    shape: str
    count: int = 1
    colour: str | None = None
    relation: str | None = None
    target: int | None = None


def requirements(prompt: Prompt) -> tuple[list[Requirement], list[Requirement]]:
    """(include, exclude) of a prompt, as GenEval's metadata for its task."""
    things = prompt.things
    if prompt.task == "single_object":
        return [Requirement(things[0].shape)], []
    if prompt.task == "colors":
        return [Requirement(things[0].shape, colour=things[0].colour)], []
    if prompt.task == "two_object":
        return [Requirement(t.shape) for t in things], []
    if prompt.task == "color_attr":
        return [Requirement(t.shape, colour=t.colour) for t in things], []
    if prompt.task == "counting":
        t = things[0]
        return [Requirement(t.shape, t.count)], [Requirement(t.shape, t.count + 1)]
    if prompt.task == "position":  # GenEval: "A right of B" includes B, then A relative to it
        return [Requirement(things[1].shape), Requirement(things[0].shape, relation=prompt.relation, target=0)], []
    raise ValueError(f"{prompt.task!r} is not a task: one of {TASKS}")


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Where a is relative to b, GenEval's rule: the centres' offset, each axis shrunk by
    POSITION_THRESHOLD x the two boxes' sizes on it, and a direction named when its cosine with
    the shrunk offset over the offset's length exceeds 0.5."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def judge(prompt: Prompt, objects: list[Detection]) -> tuple[bool, str]:
    """(correct, why not) of one image's objects against its prompt: GenEval's evaluate()."""
    include, exclude = requirements(prompt)
    by_shape: dict[str, list[Detection]] = {}
    for o in objects:
        by_shape.setdefault(o.shape, []).append(o)
    correct, reasons, matched_groups = True, [], []
    for req in include:
        found = by_shape.get(req.shape, [])[: req.count]
        matched = len(found) >= req.count
        if not matched:
            reasons.append(f"expected {req.shape}>={req.count}, found {len(found)}")
        else:
            if req.colour is not None:
                colours = [o.colour for o in found]
                if colours.count(req.colour) < req.count:
                    matched = False
                    reasons.append(f"expected {req.colour} {req.shape}>={req.count}, found {colours}")
            if req.relation is not None and matched:
                targets = matched_groups[req.target]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {req.shape} to be {req.relation}")
                else:
                    for o in found:
                        for t in targets:
                            if req.relation not in (seen := relative_position(o, t)):
                                matched = False
                                reasons.append(f"expected {req.shape} {req.relation} target, found {sorted(seen)}")
                                break
                        if not matched:
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in exclude:
        if len(by_shape.get(req.shape, [])) >= req.count:
            correct = False
            reasons.append(f"expected {req.shape}<{req.count}, found {len(by_shape[req.shape])}")
    return correct, "; ".join(reasons)


# ------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class Judgement:
    prompt: Prompt
    correct: bool
    reason: str  # empty when correct
    objects: tuple[Detection, ...]


@dataclass
class Score:
    """The judgements of a set of images (one split): per task, the share correct; overall, the
    mean of the task accuracies, as GenEval reports."""

    judgements: list[Judgement] = field(default_factory=list)

    @property
    def correct(self) -> np.ndarray:
        return np.array([j.correct for j in self.judgements], dtype=bool)

    @property
    def tasks(self) -> dict[str, float]:
        out = {}
        for task in TASKS:
            flags = [j.correct for j in self.judgements if j.prompt.task == task]
            if flags:
                out[task] = float(np.mean(flags))
        return out

    @property
    def overall(self) -> float | None:
        tasks = self.tasks
        return float(np.mean(list(tasks.values()))) if tasks else None

    def to_json(self) -> dict:
        return {
            "overall": self.overall,
            "tasks": self.tasks,
            "images": len(self.judgements),
            "prompts": len({j.prompt.text for j in self.judgements}),
        }


def to_pixels(images, resolution_px: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) or float [N, 3, H, W] in [-1, 1] -> float NCHW in [-1, 1]."""
    if (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        or torch.is_tensor(images)
        and images.dtype == torch.uint8
    ):
        images = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (resolution_px, resolution_px):
        raise ValueError(
            f"the compositional yardstick takes uint8 [N, {resolution_px}, {resolution_px}, 3] or float "
            f"[N, 3, {resolution_px}, {resolution_px}] in [-1, 1] (its segmenter's resolution), got "
            f"{tuple(images.shape)}"
        )
    return images


class Yardstick:
    """A trained segmenter, its resolution and the detection threshold; evaluation mode throughout."""

    def __init__(
        self,
        net: SegmenterNet,
        resolution_px: int,
        meta: dict,
        device: str = "cpu",
        min_object_fraction: float = MIN_OBJECT_FRACTION,
    ):
        self.net = net.eval().to(device, memory_format=torch.channels_last)
        self.resolution_px, self.meta = resolution_px, meta
        self.device, self.min_object_fraction = device, min_object_fraction

    def segment(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel probabilities: shape [N, 5, H, W] and colour [N, 7, H, W] (class 0: background)."""
        x = to_pixels(images, self.resolution_px)
        shapes, colours = [], []
        with torch.no_grad():
            for start in range(0, len(x), BATCH):
                chunk = x[start : start + BATCH].to(self.device, memory_format=torch.channels_last)
                shape_logits, colour_logits = self.net(chunk)
                shapes.append(shape_logits.softmax(1).cpu().numpy())
                colours.append(colour_logits.softmax(1).cpu().numpy())
        if not shapes:
            side = self.resolution_px
            return np.zeros((0, len(SHAPE_CLASSES), side, side)), np.zeros((0, len(COLOUR_CLASSES), side, side))
        return np.concatenate(shapes), np.concatenate(colours)

    def detect(self, images) -> list[list[Detection]]:
        shape_probs, colour_probs = self.segment(images)
        min_area = self.min_object_fraction * self.resolution_px**2
        return [detect(s, c, min_area) for s, c in zip(shape_probs, colour_probs)]

    def score(self, images, prompts: list[Prompt]) -> Score:
        """Each image judged against its prompt (one per image)."""
        found = self.detect(images)
        if len(found) != len(prompts):
            raise ValueError(f"{len(found)} images and {len(prompts)} prompts: give one prompt per image")
        judgements = []
        for objects, prompt in zip(found, prompts):
            correct, reason = judge(prompt, objects)
            judgements.append(Judgement(prompt, correct, reason, tuple(objects)))
        return Score(judgements)

    def save(self, folder: Path) -> None:
        """folder/segmenter.safetensors and folder/meta.json, each replaced atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp = temporary_sibling(folder / WEIGHTS)
        save_file(state, str(tmp))
        commit_file(tmp, folder / WEIGHTS)
        atomic_write_json(folder / META, self.meta)

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", min_object_fraction: float = MIN_OBJECT_FRACTION) -> Yardstick:
        from safetensors.torch import load_file

        meta = json.loads((Path(folder) / META).read_text())
        net = SegmenterNet(meta["settings"]["width"])
        net.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        return cls(net, meta["resolution_px"], meta, device, min_object_fraction)


def segmenter_fingerprint(resolution_px: int, settings: SegmenterConfig) -> str:
    """Hash of the resolution, the settings, VERSION and the scenes' drawing design."""
    return content_hash(VERSION, scenes.DESIGN, resolution_px, settings.model_dump(mode="json"))


def load_or_train_segmenter(
    resolution_px: int,
    cache_dir: Path,
    settings: SegmenterConfig | None = None,
    device: str = "cpu",
    min_object_fraction: float = MIN_OBJECT_FRACTION,
) -> Yardstick:
    """The yardstick at `resolution_px`: loaded from cache_dir/<fingerprint>/ when that folder is
    complete, else trained and written there (a temporary folder renamed into place, so a
    half-written one is never read)."""
    s = settings or SegmenterConfig()
    fingerprint = segmenter_fingerprint(resolution_px, s)
    folder = Path(cache_dir) / fingerprint
    if (folder / META).is_file() and (folder / WEIGHTS).is_file():
        log.info("compositional segmenter: cached %s", folder)
        return Yardstick.load(folder, device, min_object_fraction)
    yardstick = train_segmenter(resolution_px, s, device)
    yardstick.meta["fingerprint"] = fingerprint
    yardstick.min_object_fraction = min_object_fraction
    tmp = folder.with_name(f".{fingerprint}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    yardstick.save(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another evaluation finished the same fingerprint first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return yardstick


# ------------------------------------------------------------------------------------ reading
SHORT_TASKS = {
    "single_object": "single",
    "two_object": "two",
    "counting": "count",
    "colors": "colours",
    "position": "position",
    "color_attr": "binding",
}
SPLIT_NAMES = {"seen": "seen", "held_out": "held-out"}


def summary(record) -> str:
    """One line of a CompositionalRecord: 'GenEval-style seen 0.62 (single 0.94, two 0.66, ...;
    real 1.00, noise 0.00), held-out 0.31 (...)'."""
    parts = []
    for split, figures in record.splits.items():
        tasks = ", ".join(f"{SHORT_TASKS[t]} {v:.2f}" for t, v in figures["tasks"].items())
        real, noise = record.real.get(split, {}).get("overall"), record.noise.get(split, {}).get("overall")
        bounds = f"; real {real:.2f}, noise {noise:.2f}" if real is not None and noise is not None else ""
        parts.append(f"{SPLIT_NAMES.get(split, split)} {figures['overall']:.2f} ({tasks}{bounds})")
    return "GenEval-style " + ", ".join(parts)


# ------------------------------------------------------------------------------------ picture
RIGHT, WRONG = (30, 170, 60), (210, 30, 30)


def judgement_grid(rows: list[tuple[np.ndarray, np.ndarray]], scale: int = 2) -> Image.Image:
    """One row per (uint8 NHWC images, correct flags), each image scaled `scale` x (nearest)
    inside a border that is green when it was judged right and red when wrong."""
    side = rows[0][0].shape[1] * scale
    border = max(2, scale)
    cell = side + 2 * border + 2
    columns = max(len(images) for images, _ in rows)
    grid = Image.new("RGB", (columns * cell, len(rows) * cell), (255, 255, 255))
    for r, (images, correct) in enumerate(rows):
        for c, (image, ok) in enumerate(zip(images, correct)):
            x, y = c * cell + 1, r * cell + 1
            grid.paste(Image.new("RGB", (side + 2 * border,) * 2, RIGHT if ok else WRONG), (x, y))
            grid.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x + border, y + border))
    return grid


# --------------------------------------------------------------------------------- validation
def repeat(prompts: list[Prompt], images_per_prompt: int) -> list[Prompt]:
    """Each prompt `images_per_prompt` times in a row: the prompt of each generated image."""
    return [p for p in prompts for _ in range(images_per_prompt)]


def real_images(prompts: list[Prompt], resolution_px: int, seed: int = 0) -> np.ndarray:
    """A rendered scene that makes each prompt true (sfumato.data.scenes.scene_for), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(scenes.render(scenes.scene_for(p, rng), resolution_px)) for p in prompts])


def degrade(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fixed, generated-looking damage to uint8 NHWC images: a blur of 0.7 px, tinted ground,
    mottling and Gaussian noise of 0.04 (of the range)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    n, _, h, w = x.shape
    x = _gaussian_blur(x, torch.full((n,), 0.7))
    x = x + 0.03 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    x = x + 0.03 * F.interpolate(
        torch.randn(n, 3, max(1, h // 4), max(1, w // 4), generator=generator), size=(h, w), mode="bilinear"
    )
    x = x + 0.04 * torch.randn(x.shape, generator=generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def other_prompts(prompts: list[Prompt], pool: list[Prompt] | None = None) -> list[Prompt]:
    """Each prompt replaced by a wrong one of its task: the next prompt of that task in `pool`
    (default: `prompts`; sorted by text, cyclically) whose rules differ (another shape, count,
    colour or relation), so that an image that makes the first true is judged against the second."""
    pool = sorted(set(pool if pool is not None else prompts), key=lambda p: (p.task, p.text))
    out = []
    for prompt in prompts:
        same_task = [q for q in pool if q.task == prompt.task]
        start = same_task.index(prompt) + 1 if prompt in same_task else 0
        ordered = same_task[start:] + same_task[:start]
        out.append(next((q for q in ordered if _rules(q) != _rules(prompt)), prompt))
    return out


def _rules(prompt: Prompt) -> tuple:
    """What a prompt's judgement depends on (two objects in either order are the same rules)."""
    include, exclude = requirements(prompt)
    if prompt.task != "position":
        include = sorted(include, key=repr)
    return tuple(include), tuple(exclude)


def validate(yardstick: Yardstick, prompts: dict[str, list[Prompt]], images_per_prompt: int = 4, seed: int = 0) -> dict:
    """Per split of evaluation prompts: the scores of rendered images that make each prompt true
    (`real`, the ceiling), the same degraded (`degraded`), the same against another prompt of the
    same task whose rules differ, drawn from both splits (`shuffled`), and Gaussian noise clamped
    to [-1, 1] (`noise`, the floor)."""
    pool = [p for chosen in prompts.values() for p in chosen]
    out = {}
    for split, chosen in prompts.items():
        if not chosen:
            continue
        asked = repeat(chosen, images_per_prompt)
        real = real_images(asked, yardstick.resolution_px, seed)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(asked), 3, yardstick.resolution_px, yardstick.resolution_px, generator=generator)
        out[split] = {
            "real": yardstick.score(real, asked).to_json(),
            "degraded": yardstick.score(degrade(real, seed), asked).to_json(),
            "shuffled": yardstick.score(real, other_prompts(asked, pool)).to_json(),
            "noise": yardstick.score(noise.clamp(-1, 1), asked).to_json(),
        }
    return out

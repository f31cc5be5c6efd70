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
classes are COCO's. The demo's world (sfumato.data.scenes) replaces both with a judge trained
here in about 20 s (sfumato.evaluate.segmenter): a small fully convolutional segmenter with two
per-pixel heads, shape (background + 4 shapes) and colour (background + 6 colours), trained on
freshly rendered scenes of every combination (held-out ones too: it is the judge, not the model
under test) at the run's resolution. The rendering is exact, so the targets are; augmentation
(supersampling or hard edges, blur, Gaussian and low-frequency noise, brightness, contrast and
per-channel colour jitter, tinted backgrounds, small shifts, objects 15 % smaller or larger)
makes it read generated images, which are never flat, and a few noise images with no object
teach it that noise holds nothing.

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

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sfumato.config import SegmenterConfig, content_hash
from sfumato.data import scenes
from sfumato.data.scenes import COLOURS, SHAPES, TASKS, Prompt
from sfumato.evaluate.segmenter import COLOUR_CLASSES, SHAPE_CLASSES, VERSION, SegmenterNet, gaussian_blur, train_net
from sfumato.layout import atomic_write_json, commit_file, temporary_sibling

log = logging.getLogger(__name__)

WEIGHTS, META = "segmenter.safetensors", "meta.json"
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by 0.1 x the sum of the two boxes' sizes
MIN_OBJECT_FRACTION = 0.006
BATCH = 256  # images per forward pass when scoring


def train_segmenter(resolution_px: int, settings: SegmenterConfig | None = None, device: str = "cpu") -> Yardstick:
    """A segmenter trained from nothing (sfumato.evaluate.segmenter), as a yardstick; the same
    settings give the same weights."""
    net, meta = train_net(resolution_px, settings or SegmenterConfig(), device)
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
        chance = (record.chance or {}).get(split, {}).get("overall")
        if bounds and chance is not None:
            bounds = f"; real {real:.2f}, prompt ignored {chance:.2f}, noise {noise:.2f}"
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
    x = gaussian_blur(x, torch.full((n,), 0.7))
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


def unrelated_scenes(count: int, resolution_px: int, held_out: scenes.HeldOut, seed: int = 0) -> np.ndarray:
    """`count` random scenes of the training distribution (no held-out combination), uint8 NHWC:
    what a model that draws the world well and ignores its prompt draws."""
    rng = np.random.default_rng(seed + 7919)
    return np.stack(
        [np.asarray(scenes.render(scenes.draw_scene(rng, held_out).objects, resolution_px)) for _ in range(count)]
    )


def validate(
    yardstick: Yardstick,
    prompts: dict[str, list[Prompt]],
    images_per_prompt: int = 4,
    seed: int = 0,
    held_out: scenes.HeldOut | None = None,
) -> dict:
    """Per split of evaluation prompts: the scores of rendered images that make each prompt true
    (`real`, the ceiling), the same degraded (`degraded`), the same against another prompt of the
    same task whose rules differ, drawn from both splits (`shuffled`), random training scenes
    unrelated to the prompt (`chance`: what a model that ignores its prompt scores, since a random
    scene often holds the asked shape), and Gaussian noise clamped to [-1, 1] (`noise`)."""
    pool = [p for chosen in prompts.values() for p in chosen]
    held_out = held_out or scenes.HeldOut()
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
            "chance": yardstick.score(
                unrelated_scenes(len(asked), yardstick.resolution_px, held_out, seed), asked
            ).to_json(),
            "noise": yardstick.score(noise.clamp(-1, 1), asked).to_json(),
        }
    return out

"""The demo's compositional world: scenes of 1 to 4 shapes with captions that cover GenEval's six
tasks, and the ground truth of every scene.

A scene is drawn from one of four kinds, each with its caption form:

    single     one object                   "a red circle"
    pair       two objects, different       "a red circle and a blue square"
               shapes and colours
    count      2-4 of one shape and colour  "three green stars"
    relation   two objects, different       "a red circle to the left of a blue square"
               shapes and colours, side by  (left of / right of / above / below)
               side or one above the other

Objects sit in the cells of a 2 x 2 grid (a single object in the middle, larger), with a little
jitter and no overlap, so that at 32 px every object is 9-12 px wide and a relation is never
ambiguous. The background is one plain light grey; the six object colours are the demo's
saturated ones. GenEval's tasks map onto the kinds: single_object and colors ask for one
object (judged on its shape, then on shape and colour), two_object and color_attr for a pair
(both shapes, then each colour bound to its shape), counting and position for the other two.

Held-out combinations (`held_out`, e.g. "purple star" or "three squares") are never drawn in a
training scene: no object of that colour and shape anywhere, no count scene of that number and
shape. The evaluation prompts (`evaluation_prompts`) come in two splits, `seen` (only
combinations the training data has) and `held_out` (each prompt uses at least one held-out
combination), so generalisation is measured apart from recall.

Everything here is numpy and PIL; the words and `parse_held_out`, which the config validates
`held_out` with, are sfumato.world's (no dependencies).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from sfumato.world import (  # noqa: F401  (the vocabulary, re-exported)
    BACKGROUND,
    COLOURS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    WORD_NUMBERS,
    parse_held_out,
)

KINDS = ("single", "pair", "count", "relation")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASK_KIND = {
    "single_object": "single",
    "colors": "single",
    "two_object": "pair",
    "color_attr": "pair",
    "counting": "count",
    "position": "relation",
}
# Geometry, as fractions of the side: grid cell centres, their jitter, object radii.
CELLS = (0.27, 0.73)
CELL_JITTER = 0.03
RADIUS_MULTI = (0.14, 0.18)
RADIUS_SINGLE = (0.22, 0.30)
SINGLE_JITTER = 0.08
ROTATION_RAD = 0.2
DESIGN = 1  # of the drawing: a set drawn to an earlier design is drawn again


@dataclass(frozen=True)
class Thing:
    """What a prompt asks for: `count` objects of one shape (and colour, when given)."""

    shape: str
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class Prompt:
    """One prompt of the grammar, with the task it is judged by. For `position`, `relation`
    is where things[0] is relative to things[1] ("a red circle to the left of a blue square")."""

    task: str
    text: str
    things: tuple[Thing, ...]
    relation: str | None = None

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "text": self.text,
            "things": [asdict(t) for t in self.things],
            "relation": self.relation,
        }

    @classmethod
    def from_json(cls, d: dict) -> Prompt:
        return cls(d["task"], d["text"], tuple(Thing(**t) for t in d["things"]), d.get("relation"))


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its shape, colour, centre and radius, and its box (x0, y0, x1, y1),
    all as fractions of the side (y down)."""

    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    angle: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        xs, ys = zip(*outline(self.shape, self.cx, self.cy, self.r, self.angle))
        return (max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), 1.0), min(max(ys), 1.0))

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": [round(v, 4) for v in self.box]}


@dataclass(frozen=True)
class Scene:
    kind: str
    caption: str
    objects: tuple[SceneObject, ...]
    prompt: Prompt

    def to_json(self) -> dict:
        return {"kind": self.kind, "caption": self.caption, "objects": [o.to_json() for o in self.objects]}


# ------------------------------------------------------------------------------------ grammar
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(thing: Thing) -> str:
    """'a red circle', 'an orange star', 'three green stars', 'a circle'."""
    words = " ".join(w for w in (thing.colour, thing.shape) if w)
    if thing.count == 1:
        return f"{_article(words)} {words}"
    return f"{NUMBERS[thing.count]} {words}s"


def caption(kind: str, things: tuple[Thing, ...], relation: str | None = None) -> str:
    if kind in ("single", "count"):
        return phrase(things[0])
    if kind == "pair":
        return f"{phrase(things[0])} and {phrase(things[1])}"
    joiner = {"left of": "to the left of", "right of": "to the right of"}.get(relation, relation)
    return f"{phrase(things[0])} {joiner} {phrase(things[1])}"


class HeldOut:
    """The combinations the training data never draws."""

    def __init__(self, entries: list[str] | tuple[str, ...] = ()):
        self.entries = tuple(entries)
        parsed = [parse_held_out(e) for e in self.entries]
        self.pairs = {(a, b) for k, a, b in parsed if k == "colour"}
        self.counts = {(a, b) for k, a, b in parsed if k == "count"}

    def hits(self, prompt: Prompt) -> bool:
        """Whether the prompt uses a held-out combination."""
        return any((t.colour, t.shape) in self.pairs or (t.shape, t.count) in self.counts for t in prompt.things)


def _two_things(rng: np.random.Generator) -> tuple[Thing, Thing]:
    shapes = rng.choice(len(SHAPES), 2, replace=False)
    colours = rng.choice(len(COLOURS), 2, replace=False)
    names = list(COLOURS)
    return (Thing(SHAPES[shapes[0]], names[colours[0]]), Thing(SHAPES[shapes[1]], names[colours[1]]))


def draw_prompt(rng: np.random.Generator, kind: str) -> Prompt:
    """A random prompt of one kind, judged by the kind's stricter task."""
    names = list(COLOURS)
    if kind == "single":
        thing = Thing(SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.integers(len(names)))])
        return Prompt("colors", caption(kind, (thing,)), (thing,))
    if kind == "count":
        thing = Thing(
            SHAPES[int(rng.integers(len(SHAPES)))], names[int(rng.integers(len(names)))], int(rng.integers(2, 5))
        )
        return Prompt("counting", caption(kind, (thing,)), (thing,))
    things = _two_things(rng)
    if kind == "pair":
        return Prompt("color_attr", caption(kind, things), things)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return Prompt("position", caption(kind, things, relation), things, relation)


# ------------------------------------------------------------------------------------ layout
def _cells_for(relation: str | None, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """(column, row) cells: for a relation, things[0]'s cell first, placed as it says."""
    if relation in ("left of", "right of"):
        row = int(rng.integers(2))
        first, second = (0, 1) if relation == "left of" else (1, 0)
        return [(first, row), (second, row)]
    if relation in ("above", "below"):
        col = int(rng.integers(2))
        first, second = (0, 1) if relation == "above" else (1, 0)
        return [(col, first), (col, second)]
    cells = [(c, r) for r in range(2) for c in range(2)]
    return [cells[i] for i in rng.choice(4, n, replace=False)]


def layout(prompt: Prompt, rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Objects that make the prompt true, in the 2 x 2 grid (one object: in the middle)."""
    wanted = [t for t in prompt.things for _ in range(t.count)]
    names = list(COLOURS)
    objects = []
    if len(wanted) == 1:
        t = wanted[0]
        cx, cy = 0.5 + rng.uniform(-SINGLE_JITTER, SINGLE_JITTER, 2)
        r = float(rng.uniform(*RADIUS_SINGLE))
        colour = t.colour or names[int(rng.integers(len(names)))]
        return (SceneObject(t.shape, colour, float(cx), float(cy), r, float(rng.uniform(-ROTATION_RAD, ROTATION_RAD))),)
    for t, (col, row) in zip(wanted, _cells_for(prompt.relation, rng, len(wanted))):
        cx, cy = (
            CELLS[col] + rng.uniform(-CELL_JITTER, CELL_JITTER),
            CELLS[row] + rng.uniform(-CELL_JITTER, CELL_JITTER),
        )
        colour = t.colour or names[int(rng.integers(len(names)))]
        angle = float(rng.uniform(-ROTATION_RAD, ROTATION_RAD))
        objects.append(SceneObject(t.shape, colour, float(cx), float(cy), float(rng.uniform(*RADIUS_MULTI)), angle))
    return tuple(objects)


def draw_scene(rng: np.random.Generator, held_out: HeldOut, kinds: tuple[str, ...] = KINDS) -> Scene:
    """A random training scene: a kind, a prompt that uses no held-out combination, a layout."""
    kind = kinds[int(rng.integers(len(kinds)))]
    while True:
        prompt = draw_prompt(rng, kind)
        if not held_out.hits(prompt):
            return Scene(kind, prompt.text, layout(prompt, rng), prompt)


# ------------------------------------------------------------------------------------ drawing
def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The shape's polygon (a circle as 32 points), in the units of cx, cy and r."""
    if shape == "circle":
        k = 32
        unit = [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]
    elif shape == "square":
        unit = [
            (math.cos(angle + i * math.pi / 2 + math.pi / 4), math.sin(angle + i * math.pi / 2 + math.pi / 4))
            for i in range(4)
        ]
        unit = [(x * 0.95, y * 0.95) for x, y in unit]
    elif shape == "triangle":
        unit = [
            (
                math.cos(angle + i * 2 * math.pi / 3 - math.pi / 2),
                math.sin(angle + i * 2 * math.pi / 3 - math.pi / 2) + 0.2,
            )
            for i in range(3)
        ]  # the centroid, not the circumcentre, at (cx, cy) would sit lower: lift it by 0.2 r
        unit = [(x * 1.1, y * 1.1) for x, y in unit]
    else:  # star: ten points alternating outer and inner radius
        unit = [
            (
                (1.1 if i % 2 == 0 else 0.5) * math.cos(angle + i * math.pi / 5 - math.pi / 2),
                (1.1 if i % 2 == 0 else 0.5) * math.sin(angle + i * math.pi / 5 - math.pi / 2),
            )
            for i in range(10)
        ]
    return [(cx + r * x, cy + r * y) for x, y in unit]


def render(
    objects: tuple[SceneObject, ...],
    size_px: int,
    supersample: int = 4,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """The scene as an RGB image, drawn at `supersample` x the size and box-filtered down (soft
    edges, as a photo's or a resized image's). `background`: another ground (the compositional
    yardstick's segmenter trains on tinted ones)."""
    big = size_px * supersample
    img = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw.polygon(
            [(x * big, y * big) for x, y in outline(o.shape, o.cx, o.cy, o.r, o.angle)], fill=COLOURS[o.colour]
        )
    return img.resize((size_px, size_px), Image.BOX) if supersample > 1 else img


def label_maps(objects: tuple[SceneObject, ...], size_px: int, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the shape index + 1 and the colour index + 1 of the object covering most of it
    (0: background), at `size_px`: the segmenter's targets."""
    big = size_px * supersample
    shape_map, colour_map = Image.new("L", (big, big), 0), Image.new("L", (big, big), 0)
    shape_draw, colour_draw = ImageDraw.Draw(shape_map), ImageDraw.Draw(colour_map)
    names = list(COLOURS)
    for o in objects:
        polygon = [(x * big, y * big) for x, y in outline(o.shape, o.cx, o.cy, o.r, o.angle)]
        shape_draw.polygon(polygon, fill=SHAPES.index(o.shape) + 1)
        colour_draw.polygon(polygon, fill=names.index(o.colour) + 1)
    out = []
    for m, classes in ((shape_map, len(SHAPES) + 1), (colour_map, len(names) + 1)):
        blocks = np.asarray(m).reshape(size_px, supersample, size_px, supersample).transpose(0, 2, 1, 3)
        counts = np.stack([(blocks == c).sum(axis=(-1, -2)) for c in range(classes)], axis=-1)
        out.append(counts.argmax(-1).astype(np.int64))
    return out[0], out[1]


# ------------------------------------------------------------------------------------ evaluation
def _prompt_for_task(task: str, rng: np.random.Generator) -> Prompt:
    kind = TASK_KIND[task]
    p = draw_prompt(rng, kind)
    return Prompt(task, p.text, p.things, p.relation)


def evaluation_prompts(held_out: HeldOut, per_task: int, seed: int = 0) -> dict[str, list[Prompt]]:
    """Fixed prompt sets: `seen` (per_task distinct prompts per task, none held out) and
    `held_out` (up to per_task distinct prompts per task, each using a held-out combination;
    tasks that cannot use one are left out). The same arguments give the same prompts."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Prompt]] = {"seen": [], "held_out": []}
    for task in TASKS:
        for split, want in (("seen", False), ("held_out", True)):
            if want and not (held_out.pairs or held_out.counts):
                continue
            chosen: dict[str, Prompt] = {}
            for _ in range(20_000):
                if len(chosen) == per_task:
                    break
                p = _prompt_for_task(task, rng) if not want else _held_out_prompt(task, held_out, rng)
                if p is not None and held_out.hits(p) == want:
                    chosen.setdefault(p.text, p)
            splits[split] += sorted(chosen.values(), key=lambda p: p.text)
    return splits


def _held_out_prompt(task: str, held_out: HeldOut, rng: np.random.Generator) -> Prompt | None:
    """A prompt of `task` built around one held-out combination (None if the task cannot use any)."""
    names = list(COLOURS)
    if task == "counting":
        if not held_out.counts:
            return None
        shape, n = sorted(held_out.counts)[int(rng.integers(len(held_out.counts)))]
        thing = Thing(shape, names[int(rng.integers(len(names)))], n)
        return Prompt(task, caption("count", (thing,)), (thing,))
    if not held_out.pairs:
        return None
    colour, shape = sorted(held_out.pairs)[int(rng.integers(len(held_out.pairs)))]
    first = Thing(shape, colour)
    if TASK_KIND[task] == "single":
        return Prompt(task, caption("single", (first,)), (first,))
    others = [Thing(s, c) for s in SHAPES for c in names if s != shape and c != colour]
    second = others[int(rng.integers(len(others)))]
    things = (first, second) if rng.integers(2) else (second, first)
    if task == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return Prompt(task, caption("relation", things, relation), things, relation)
    return Prompt(task, caption("pair", things), things)


def scene_for(prompt: Prompt, rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """A correct layout of any prompt (the yardstick's real images, and its tests)."""
    return layout(prompt, rng)

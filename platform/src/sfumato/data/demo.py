"""The embedded demo dataset: captioned procedural shapes the project draws itself.

It needs no download and its licence is known (CC0-1.0, made here), so the pilot runs anywhere.
Each image is one coloured shape on a plain background with a caption that names both colours
and the shape ("a red circle on a blue background"), which gives a trained model structure a
person can check in a sample grid: flat backgrounds, one centred object, matching colours.
The files are written once per (count, size, seed); a completed set is marked and reused.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sfumato import world
from sfumato.layout import atomic_write_json, commit_file, temporary_sibling

# The compositional world's six object colours (sfumato.world), then the two the shapes mode also
# uses as grounds and shapes.
COLOURS = {**world.COLOURS, "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = world.SHAPES
# Shape and colour pair with a contrast a 32 px model and the yardstick classifier can resolve: a
# radius of 0.30-0.42 of the side (0.22-0.36 before, when a 7 px square and circle blurred into one
# blob at 32 px), rotation within +-0.2 rad, and only the 50 of 56 ordered colour pairs that are at
# least 120 RGB levels apart (Euclidean; it drops e.g. orange on yellow and red on orange).
RADIUS = (0.30, 0.42)
ROTATION_RAD = 0.2
OFFSET = 0.06
MIN_CONTRAST = 120.0
PAIRS = [
    (fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg and math.dist(COLOURS[fg], COLOURS[bg]) >= MIN_CONTRAST
]
DESIGN = 2  # in the completion marker: a set drawn to an earlier design is drawn again
SOURCE_URI = "sfumato demo generator (procedural shapes)"
SCENES_URI = "sfumato demo generator (compositional scenes)"
SCENES = "scenes.jsonl"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        points = [
            (math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
            for k in range(4)
        ]
    elif shape == "triangle":
        points = [
            (math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2), math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2))
            for k in range(3)
        ]
    else:  # star: ten points alternating outer and inner radius
        points = [
            (
                (1.0 if k % 2 == 0 else 0.45) * math.cos(angle + k * math.pi / 5 - math.pi / 2),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + k * math.pi / 5 - math.pi / 2),
            )
            for k in range(10)
        ]
    return [(cx + r * x, cy + r * y) for x, y in points]


def draw_sample(rng: np.random.Generator, size_px: int) -> tuple[Image.Image, str, str]:
    """One image, its caption and its shape name (the class tag)."""
    fg, bg = PAIRS[int(rng.integers(len(PAIRS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    img = Image.new("RGB", (size_px, size_px), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    r = size_px * float(rng.uniform(*RADIUS))
    cx = size_px / 2 + size_px * float(rng.uniform(-OFFSET, OFFSET))
    cy = size_px / 2 + size_px * float(rng.uniform(-OFFSET, OFFSET))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[fg])
    else:
        draw.polygon(_polygon(shape, cx, cy, r, float(rng.uniform(-ROTATION_RAD, ROTATION_RAD))), fill=COLOURS[fg])
    article = "an" if fg[0] in "aeiou" else "a"
    caption = f"{article} {fg} {shape} on a {bg} background"
    return img, caption, shape


def ensure_demo(src, folder: Path) -> Path:
    """Draw the demo set into `folder` unless a complete one with the same parameters is there;
    returns the path of its table (path, id, caption, license, source, tags). In scenes mode the
    ground truth of every scene (kind, caption, each object's shape, colour and box) goes to
    `folder/scenes.jsonl`, one line per id."""
    from sfumato.data import scenes

    table = folder / "demo.csv"
    marker = folder / "COMPLETE.json"
    mode = getattr(src, "mode", "shapes")
    params = {"num_images": src.num_images, "image_size_px": src.image_size_px, "seed": src.seed, "design": DESIGN}
    if mode == "scenes":
        params |= {"mode": mode, "held_out": list(src.held_out), "scene_design": scenes.DESIGN}
    if marker.exists() and json.loads(marker.read_text()) == params and table.exists():
        return table
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(src.seed)
    held_out = scenes.HeldOut(getattr(src, "held_out", ()))
    tmp = temporary_sibling(table)
    truth = None if mode != "scenes" else temporary_sibling(folder / SCENES).open("w")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "id", "caption", "license", "source", "tags"])
        for i in range(src.num_images):
            name, sample_id = f"images/{i:07d}.png", f"{src.name}-{i:07d}"
            if truth is None:
                img, caption, tag = draw_sample(rng, src.image_size_px)
            else:
                scene = scenes.draw_scene(rng, held_out)
                img, caption, tag = scenes.render(scene.objects, src.image_size_px), scene.caption, scene.kind
                truth.write(json.dumps({"id": sample_id, **scene.to_json()}) + "\n")
            img.save(folder / name, "PNG")
            writer.writerow([name, sample_id, caption, src.license, SCENES_URI if truth else SOURCE_URI, tag])
    if truth is not None:
        truth.close()
        commit_file(Path(truth.name), folder / SCENES)
    commit_file(tmp, table)
    atomic_write_json(marker, params)  # last: marks the set complete
    return table


def read_scene_truth(folder: Path) -> dict[str, dict]:
    """id -> the scene's ground truth (kind, caption, objects with shape, colour, box) of a
    scenes-mode demo folder."""
    path = folder / SCENES
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: it is written by a demo source with mode: scenes")
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def two_colour_share(images: np.ndarray, tolerance: float = 48.0) -> float:
    """How much a set of RGB images (N, H, W, 3 uint8) looks like the demo's: per image, the share
    of pixels within `tolerance` (Euclidean, 0-255 levels) of the two palette colours it uses most
    (a flat background and one shape), averaged. The demo's own images score near 1 (less only
    where resizing blends an edge); noise, or a model that has not learnt the flat colours, near 0."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
    pixels = images.reshape(len(images), -1, 3).astype(np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # (N, P, 8)
    nearest, close = distance.argmin(-1), distance.min(-1) <= tolerance
    shares = []
    for labels, ok in zip(nearest, close):
        counts = np.bincount(labels[ok], minlength=len(palette))
        shares.append(np.sort(counts)[-2:].sum() / labels.size)
    return float(np.mean(shares))

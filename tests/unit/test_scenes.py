"""The demo's compositional world (sfumato.data.scenes): its ground truth is what its pixels show,
its grammar covers GenEval's tasks, and a held-out combination never reaches a training set."""

import csv
import re

import numpy as np
import pytest

from sfumato.config import DemoSource
from sfumato.data import scenes
from sfumato.data.demo import ensure_demo, read_scene_truth

SIZE_PX = 32
HELD_OUT = ["purple star", "orange circle", "three squares"]


def drawn(count: int, seed: int = 0) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    return [scenes.draw_scene(rng, scenes.HeldOut()) for _ in range(count)]


def test_each_object_shows_its_colour_at_its_centre_and_the_ground_is_plain_outside_every_box():
    for scene in drawn(200):
        pixels = np.asarray(scenes.render(scene.objects, SIZE_PX)).astype(int)
        for o in scene.objects:
            centre = pixels[int(o.cy * SIZE_PX), int(o.cx * SIZE_PX)]
            assert np.abs(centre - scenes.COLOURS[o.colour]).max() <= 2, (scene.caption, o)
        # A pixel whose square meets no object's box is the background exactly.
        edges = np.arange(SIZE_PX + 1) / SIZE_PX
        outside = np.ones((SIZE_PX, SIZE_PX), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            cols = (edges[1:] > x0) & (edges[:-1] < x1)
            rows = (edges[1:] > y0) & (edges[:-1] < y1)
            outside &= ~(rows[:, None] & cols[None, :])
        assert outside.sum() > SIZE_PX * SIZE_PX / 4
        assert (pixels[outside] == scenes.BACKGROUND).all(), scene.caption


def test_label_maps_agree_with_the_rendered_pixels():
    names = list(scenes.COLOURS)
    for scene in drawn(100, seed=1):
        pixels = np.asarray(scenes.render(scene.objects, SIZE_PX)).astype(int)
        shape_map, colour_map = scenes.label_maps(scene.objects, SIZE_PX)
        assert ((shape_map > 0) == (colour_map > 0)).all()
        assert set(np.unique(shape_map)) - {0} == {scenes.SHAPES.index(o.shape) + 1 for o in scene.objects}
        # Every pixel's nearest palette colour is its label's; away from edges (a pixel whose 3x3
        # neighbourhood has one label) the pixel is that colour, bar a star's thin points.
        palette = np.array([scenes.BACKGROUND, *(scenes.COLOURS[n] for n in names)])
        nearest = np.linalg.norm(pixels[:, :, None] - palette, axis=-1).argmin(-1)
        assert (nearest == colour_map).mean() >= 0.97, scene.caption
        padded = np.pad(colour_map, 1, mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
        interior = (windows == colour_map[..., None, None]).all((-1, -2))
        assert interior.sum() > SIZE_PX * SIZE_PX / 2
        assert (nearest[interior] == colour_map[interior]).all(), scene.caption
        assert np.median(np.abs(pixels[interior] - palette[colour_map][interior]).max(-1)) == 0


def test_the_grammar_produces_every_task_and_kind():
    prompts = scenes.evaluation_prompts(scenes.HeldOut(HELD_OUT), per_task=4, seed=0)
    for split in ("seen", "held_out"):
        assert {p.task for p in prompts[split]} == set(scenes.TASKS), split
        assert all(scenes.HeldOut(HELD_OUT).hits(p) == (split == "held_out") for p in prompts[split])
    assert {s.kind for s in drawn(200)} == set(scenes.KINDS)
    position = next(p for p in prompts["seen"] if p.task == "position")
    assert position.relation in scenes.RELATIONS and len(position.things) == 2
    counting = next(p for p in prompts["seen"] if p.task == "counting")
    assert counting.things[0].count in scenes.NUMBERS and counting.text.split()[0] in scenes.WORD_NUMBERS
    # The same arguments give the same prompts.
    assert scenes.evaluation_prompts(scenes.HeldOut(HELD_OUT), per_task=4, seed=0) == prompts


def test_a_layout_makes_its_prompt_true():
    rng = np.random.default_rng(2)
    for prompt in scenes.evaluation_prompts(scenes.HeldOut(HELD_OUT), per_task=6, seed=1)["seen"]:
        objects = scenes.scene_for(prompt, rng)
        wanted = sorted((t.shape, t.colour) for t in prompt.things for _ in range(t.count))
        assert sorted((o.shape, o.colour) for o in objects) == wanted, prompt.text
        if prompt.task == "position":
            first, second = objects
            dx, dy = first.cx - second.cx, first.cy - second.cy
            facing = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[prompt.relation]
            assert facing > 0.3, prompt.text


def test_a_scenes_demo_set_never_draws_a_held_out_combination(tmp_path):
    source = DemoSource(kind="demo", name="scenes", mode="scenes", num_images=300, image_size_px=32, held_out=HELD_OUT)
    table = ensure_demo(source, tmp_path)
    truth = read_scene_truth(tmp_path)
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(truth) == 300
    held = scenes.HeldOut(HELD_OUT)
    objects = [(o["colour"], o["shape"]) for row in truth.values() for o in row["objects"]]
    assert not held.pairs & set(objects)
    for row in truth.values():
        shapes = {o["shape"] for o in row["objects"]}
        if row["kind"] == "count":
            assert (shapes.pop(), len(row["objects"])) not in held.counts, row
    for row in rows:
        caption = row["caption"]
        assert caption == truth[row["id"]]["caption"] and row["tags"] == truth[row["id"]]["kind"]
        assert not re.search(r"purple stars?\b|orange circles?\b|three squares\b", caption), caption
    # The hold-out is not vacuous: purple things, stars and three of a kind are all drawn.
    assert {"purple", "orange"} <= {c for c, _ in objects} and {"star", "circle"} <= {s for _, s in objects}
    assert any(len(r["objects"]) == 3 and r["kind"] == "count" for r in truth.values())


@pytest.mark.parametrize("entry", ["purple", "violet star", "five stars", "three", "red circle square"])
def test_a_wrong_held_out_entry_is_named_in_the_error(entry):
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        scenes.parse_held_out(entry)
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        DemoSource(kind="demo", name="scenes", mode="scenes", held_out=[entry])

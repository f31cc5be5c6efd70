"""`sfumato bench quality --text`'s parts: the world it races on and its trainer, and how it
sums up seeds. (The race itself is the bench: figures in BENCHMARKS.md.) A bench's own test."""

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import REPO  # noqa: E402


def test_the_text_race_draws_the_pilots_world_without_its_held_out_combinations_and_its_trainer_generates():
    from sfumato.bench.quality_text import DEFAULT_RECIPES, TextTrainer, batches, draw_world, load_recipe, scenes_source
    from sfumato.data.scenes import HeldOut
    from sfumato.models.text import train_tokenizer

    src = scenes_source(REPO)
    images, captions = draw_world(src, 200)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    held = HeldOut(src.held_out)
    forbidden = [f" {c} {s}" for c, s in held.pairs]  # colour-shape pairs
    assert not [c for c in captions if any(f in f" {c}" for f in forbidden)], "a held-out pair was drawn"
    cfg = load_recipe(DEFAULT_RECIPES["pilot-text"], REPO)
    trainer = TextTrainer(cfg, train_tokenizer(captions, 300, cfg.train.text.max_length), seed=0)
    batch = next(batches(images, captions, 4, seed=0))
    assert np.isfinite(trainer.step(batch))
    out = trainer.generate(["a red circle", "three blue stars", "a green square above a red star"], seed=0, steps=2)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8


def test_the_text_race_reports_the_mean_and_the_sample_spread_of_its_seeds():
    from sfumato.bench.quality_text import summarise

    final = lambda seen, held: {  # noqa: E731
        "seen": {"overall": seen, "tasks": {"colors": seen}},
        "held_out": {"overall": held, "tasks": {"colors": held}},
    }
    s = summarise([final(0.5, 0.1), final(0.7, 0.3)])
    assert s["seen"]["overall"]["mean"] == pytest.approx(0.6) and s["seen"]["overall"]["std"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert s["held_out"]["tasks"]["colors"]["seeds"] == [0.1, 0.3]


def test_the_shuffled_captions_floor_keeps_the_words_but_parts_them_from_their_images():
    from sfumato.bench.quality_text import draw_world, scenes_source, shuffled

    _, captions = draw_world(scenes_source(REPO), 300)
    floor = shuffled(captions)
    assert sorted(floor) == sorted(captions), "the floor trains on the same captions"
    kept = sum(a == b for a, b in zip(floor, captions))
    assert kept < 0.1 * len(captions), f"{kept} of {len(captions)} scenes kept their own caption"
    assert shuffled(captions) == floor, "the same permutation every run"


def test_races_run_side_by_side_merge_into_one_table_with_each_recipes_time_to_the_references_final(tmp_path):
    """Seeds of one recipe from two processes join (mean and spread over all of them); the time to
    target is where a recipe's seed-mean curve first reaches the reference's final seed mean."""
    import json

    from sfumato.bench.quality_text import merged, summarise

    def point(cpu_s, seen, held):
        return {
            "cpu_s": cpu_s,
            "steps": int(cpu_s),
            "seen": {"overall": seen, "tasks": {"colors": seen}},
            "held_out": {"overall": held, "tasks": {"colors": held}},
        }

    def run(name, curves):
        recipe = {"spec": name, "cpu_s": 300.0, "steps": 0, "curves": curves}  # merging recounts pooled steps
        recipe["summary"] = summarise([c[-1] for c in curves])
        return {"scenes": 10, "seeds": [0], "wall_s": 1.0, "recipes": {name: recipe}}

    unet = [[point(100, 0.1, 0.1), point(200, 0.2, 0.1), point(300, 0.3, 0.2)]]
    dit_a = [[point(100, 0.0, 0.0), point(200, 0.3, 0.3), point(300, 0.5, 0.3)]]
    dit_b = [[point(100, 0.0, 0.0), point(200, 0.2, 0.1), point(300, 0.3, 0.1)]]
    paths = []
    for i, r in enumerate([run("unet", unet), run("dit", dit_a), run("dit", dit_b)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    out = merged([str(p) for p in paths], "unet", str(tmp_path / "merged.json"))
    assert len(out["recipes"]["dit"]["curves"]) == 2 and out["recipes"]["dit"]["steps"] == 300
    assert out["recipes"]["dit"]["summary"]["seen"]["overall"]["mean"] == pytest.approx(0.4)
    seen, held = out["versus"]["seen"], out["versus"]["held_out"]
    assert seen["dit"] == {"target": pytest.approx(0.3), "cpu_s": 300, "share": 1.0}, "mean 0.25 at 200 < 0.3"
    assert held["dit"]["cpu_s"] == 200 and held["dit"]["share"] == pytest.approx(0.667, abs=1e-3)
    assert seen["unet"]["cpu_s"] == 300, "the reference reaches its own final at its end"
    assert json.loads((tmp_path / "merged.json").read_text())["versus"]["reference"] == "unet"

"""The compositional yardstick (sfumato.evaluate.compositional): GenEval's rules on hand-made
detections, and a segmenter trained here that scores rendered scenes right, a wrong prompt wrong
and noise zero, the same for the same seed."""

import numpy as np
import pytest
import torch

from sfumato.config import SegmenterConfig
from sfumato.data.scenes import TASKS, HeldOut, Prompt, Thing, evaluation_prompts
from sfumato.evaluate.compositional import (
    Detection,
    judge,
    load_or_train_segmenter,
    other_prompts,
    real_images,
    relative_position,
    repeat,
    train_segmenter,
    validate,
)

HELD_OUT = HeldOut(["purple star", "orange circle", "green triangle", "three squares"])
TINY = SegmenterConfig(scenes=64, epochs=1)


@pytest.fixture(scope="module")
def yardstick(tmp_path_factory):
    """The pilot's segmenter (default settings, 32 px), trained once through the cache."""
    return load_or_train_segmenter(32, tmp_path_factory.mktemp("segmenter"), SegmenterConfig())


@pytest.fixture(scope="module")
def prompts():
    return evaluation_prompts(HELD_OUT, per_task=4, seed=3)


def thing(shape, colour=None, count=1):
    return Thing(shape, colour, count)


def at(shape, colour, x, y, side=10):
    """A detection of `side` px centred at (x, y)."""
    return Detection(shape, colour, (x - side // 2, y - side // 2, x + side // 2, y + side // 2), side * side)


# ------------------------------------------------------------------ GenEval's rules, no network
def test_counting_is_exact_and_ignores_other_shapes():
    three = Prompt("counting", "three red stars", (thing("star", "red", 3),))
    stars = [at("star", "red", 8 + 8 * i, 8) for i in range(4)]
    assert judge(three, stars[:3])[0]
    assert judge(three, stars[:3] + [at("circle", "blue", 24, 24)])[0]
    assert not judge(three, stars[:2])[0]
    correct, reason = judge(three, stars)
    assert not correct and "star<4" in reason


def test_colours_bind_to_their_shapes():
    prompt = Prompt("color_attr", "a red circle and a blue square", (thing("circle", "red"), thing("square", "blue")))
    assert judge(prompt, [at("circle", "red", 8, 8), at("square", "blue", 24, 24)])[0]
    swapped = [at("circle", "blue", 8, 8), at("square", "red", 24, 24)]
    assert not judge(prompt, swapped)[0]
    # two_object asks for the shapes alone: the swapped colours pass it.
    assert judge(Prompt("two_object", prompt.text, prompt.things), swapped)[0]
    # single_object asks for the shape, colors for shape and colour.
    red_circle = (thing("circle", "red"),)
    assert judge(Prompt("single_object", "a red circle", red_circle), [at("circle", "green", 16, 16)])[0]
    assert not judge(Prompt("colors", "a red circle", red_circle), [at("circle", "green", 16, 16)])[0]
    assert not judge(Prompt("colors", "a red circle", red_circle), [])[0]


def test_position_uses_box_centres_with_genevals_threshold():
    a, b = at("circle", "red", 8, 16), at("square", "blue", 24, 16)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    # Offsets within 0.1 x the two boxes' sizes are no relation: 10 px boxes, 1 px apart.
    assert relative_position(at("circle", "red", 16, 16), at("square", "blue", 17, 16)) == set()
    # A diagonal offset names both directions.
    assert relative_position(at("circle", "red", 8, 8), at("square", "blue", 24, 24)) == {"left of", "above"}
    left = Prompt(
        "position", "a red circle to the left of a blue square", (thing("circle"), thing("square")), "left of"
    )
    assert judge(left, [a, b])[0]
    correct, reason = judge(left, [at("circle", "red", 24, 16), at("square", "blue", 8, 16)])
    assert not correct and "left of" in reason
    assert not judge(left, [b])[0]


def test_a_wrong_prompt_differs_in_what_is_judged(prompts):
    asked = prompts["seen"] + prompts["held_out"]
    wrong = other_prompts(asked)
    for prompt, other in zip(asked, wrong):
        assert other.task == prompt.task and other != prompt


# ---------------------------------------------------------------------- the trained segmenter
def test_rendered_scenes_score_right_noise_and_wrong_prompts_wrong(yardstick, prompts):
    figures = validate(yardstick, prompts, images_per_prompt=2, seed=1)
    for split in ("seen", "held_out"):
        assert set(figures[split]["real"]["tasks"]) == set(TASKS), split
        assert figures[split]["real"]["overall"] >= 0.95, (split, figures[split]["real"])
        assert figures[split]["degraded"]["overall"] >= 0.9, (split, figures[split]["degraded"])
        assert figures[split]["shuffled"]["overall"] <= 0.1, (split, figures[split]["shuffled"])
        assert figures[split]["noise"]["overall"] <= 0.05, (split, figures[split]["noise"])
        assert figures[split]["chance"]["overall"] <= 0.5, (split, figures[split]["chance"])
    # Random scenes of the world, unrelated to the prompt, hold an asked shape often enough that a
    # model ignoring its seen prompts scores well above noise (GenEval's single-object task judges
    # the shape alone): the figure a model's score is read against.
    chance = figures["seen"]["chance"]
    assert chance["overall"] >= 0.05 and chance["tasks"]["single_object"] >= 0.25, chance


def test_each_judgement_names_what_was_found(yardstick, prompts):
    asked = repeat(prompts["seen"], 1)
    images = real_images(asked, 32, seed=2)
    result = yardstick.score(images, asked)
    assert result.correct.shape == (len(asked),)
    for judgement in result.judgements:
        if judgement.prompt.task == "counting":
            assert len(judgement.objects) == judgement.prompt.things[0].count or not judgement.correct
        assert judgement.correct == (judgement.reason == "")
    # uint8 NHWC and float NCHW in [-1, 1] are read alike.
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (yardstick.score(floats, asked).correct == result.correct).all()
    with pytest.raises(ValueError, match="32"):
        yardstick.score(images[:, :16, :16], asked)


def test_the_same_seed_gives_the_same_segmenter_and_the_cache_returns_it(tmp_path, prompts):
    first, second = train_segmenter(32, TINY), train_segmenter(32, TINY)
    # Equal to rounding: oneDNN's multi-threaded weight-gradient sums may round differently when
    # the machine is busy (as in test_domain); on a quiet machine they are equal bit for bit.
    for (name, a), b in zip(first.net.state_dict().items(), second.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    other = train_segmenter(32, TINY.model_copy(update={"seed": 1}))
    assert not torch.equal(first.net.at_full[0].weight, other.net.at_full[0].weight)
    cached = load_or_train_segmenter(32, tmp_path, TINY)
    again = load_or_train_segmenter(32, tmp_path, TINY)
    assert len(list(tmp_path.iterdir())) == 1
    images = real_images(prompts["seen"], 32)
    probabilities = [np.concatenate(y.segment(images), 1) for y in (first, cached, again)]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-4)
    assert np.array_equal(probabilities[1], probabilities[2]), "the cache returns the weights it wrote"

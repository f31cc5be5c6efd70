"""`sfumato bench quality`'s parts on real data: CIFAR-10 read balanced (from the repository's
fixture images here, from the shared archive in the bench), a held-out split the trainers never
see, each trainer's step and sampler, and the time-to-target read off a curve. (The race itself
is the bench: figures in BENCHMARKS.md.) A bench's own test, the one kind of test that may import
a bench (tests/unit/test_imports.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import REPO  # noqa: E402
from sfumato.bench.quality import (
    Curve,
    PlainSettings,
    PlainTrainer,
    SfumatoTrainer,
    batches,
    cifar10,
    first_reaching,  # noqa: E402
    recipe,
    seed_table,
    seeds,
    shapes,
    split,
    summarise,
)


def test_cifar_is_read_balanced_and_the_held_out_split_is_disjoint(cifar_dir):
    data = cifar10(cifar_dir, per_class=3)
    assert data.images.shape == (30, 32, 32, 3) and data.images.dtype == np.uint8
    assert len(data.class_names) == 10 and np.bincount(data.labels).tolist() == [3] * 10
    train, held = split(data, 0.2, seed=0)
    assert (len(train.labels), len(held.labels)) == (24, 6)
    rows = lambda d: {img.tobytes() for img in d.images}  # noqa: E731
    assert not rows(train) & rows(held) and rows(train) | rows(held) == rows(data)
    first = next(batches(train, 8, seed=1))
    assert first["image"].shape == (8, 32, 32, 3) and next(batches(train, 8, seed=1))["id"] == first["id"]


@pytest.mark.parametrize("name", ["plain", "sfumato-ddpm", "sfumato-flow"])
def test_each_trainer_steps_and_generates_the_asked_count(name):
    data = shapes(8, seed=0)
    if name == "plain":
        trainer = PlainTrainer(len(data.class_names), seed=0)
    else:
        cfg = recipe(name.removeprefix("sfumato-"), REPO)
        assert cfg.diffusion.objective == name.removeprefix("sfumato-")
        trainer = SfumatoTrainer(cfg, len(data.class_names), data.class_names, 4, 100, seed=0)
    loss = trainer.step(next(batches(data, 4, seed=0)))
    assert np.isfinite(loss) and loss > 0
    images = trainer.generate(np.array([0, 1, 2]), seed=0)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


def test_a_plain_loops_name_spells_its_switches_and_bad_ones_are_refused():
    assert PlainSettings.parse("plain") == PlainSettings()  # the tutorial as written: lr 1e-4, nothing else
    tuned = PlainSettings.parse("plain+lr3e-3+cfg+ema")
    assert (tuned.lr, tuned.cfg, tuned.ema) == (3e-3, True, True)
    for bad in ("plain+lrfast", "plain+minsnr", "sfumato+cfg"):
        with pytest.raises(ValueError, match="plain"):
            PlainSettings.parse(bad)


def test_the_competent_plain_loop_drops_labels_guides_and_samples_from_its_ema(cifar_dir):
    data = cifar10(cifar_dir, per_class=2)
    trainer = PlainTrainer(10, seed=0, settings=PlainSettings.parse("plain+lr1e-3+cfg+ema"), micro_batch=8)
    assert trainer.model.class_embedding.num_embeddings == 11, "the null class of condition dropout"
    before = {k: v.clone() for k, v in trainer.averaged.module.state_dict().items()}
    feed = batches(data, 8, seed=0)
    for _ in range(3):
        assert np.isfinite(trainer.step(next(feed)))
    # The EMA moved, and lags the raw weights (it is what generates).
    ema, raw = trainer.averaged.module.state_dict(), trainer.model.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], ema[k])]
    assert moved and any(not torch.equal(ema[k], raw[k]) for k in moved)
    images = trainer.generate(np.array([0, 1]), seed=0)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    # Guidance changes the images: the same weights at guidance 1 draw others.
    trainer.settings = PlainSettings.parse("plain+lr1e-3+cfg+ema", guidance=1.0)
    assert not torch.equal(trainer.generate(np.array([0, 1]), seed=0), images)


def test_time_to_target_is_the_first_score_as_good_as_the_target():
    curve = Curve(
        "x",
        [
            {"cpu_s": 10, "class_accuracy": 0.3, "fd_domain": 90.0},
            {"cpu_s": 20, "class_accuracy": 0.8, "fd_domain": 40.0},
            {"cpu_s": 30, "class_accuracy": 0.7, "fd_domain": 20.0},
        ],
    )
    assert first_reaching(curve, "class_accuracy", 0.75) == 20
    assert first_reaching(curve, "fd_domain", 30.0) == 30
    assert first_reaching(curve, "class_accuracy", 0.9) is None


def test_tuning_and_fresh_seeds_are_disjoint_by_construction():
    from types import SimpleNamespace

    def chosen(**given):
        return seeds(SimpleNamespace(**{"seed": 0, "seeds": 1, "first_seed": None, "seed_set": None, **given}))

    assert chosen() == [0] and chosen(seed=7) == [7] and chosen(seeds=3, first_seed=5) == [5, 6, 7]
    tuning, fresh = chosen(seed_set="tuning", seeds=3), chosen(seed_set="fresh", seeds=3)
    assert tuning == [100, 101, 102] and fresh == [200, 201, 202]
    with pytest.raises(SystemExit, match="fresh is seeds 200-299"):
        chosen(seed_set="fresh", first_seed=100)  # a tuning seed reported as fresh
    with pytest.raises(SystemExit, match="tuning is seeds 100-199"):
        chosen(seed_set="tuning", first_seed=198, seeds=3)


def test_several_seeds_give_mean_spread_and_each_seeds_final():
    def run(accuracy, fd, steps):
        point = {"class_accuracy": accuracy, "fd_domain": fd, "steps": steps}
        return {"cifar10": {"curves": {"plain": [{"class_accuracy": 0.1, "fd_domain": 99, "steps": 1}, point]}}}

    summary = summarise({200: run(0.3, 8.0, 100), 201: run(0.5, 6.0, 110)})
    accuracy = summary["cifar10"]["plain"]["class_accuracy"]
    assert accuracy["seeds"] == [0.3, 0.5] and accuracy["mean"] == pytest.approx(0.4)
    assert accuracy["std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert summary["cifar10"]["plain"]["steps"]["mean"] == 105
    text = seed_table(summary, [200, 201], "fresh")
    assert "seeds 200-201 (fresh seeds)" in text and "0.400 ± 0.141 (0.300, 0.500)" in text

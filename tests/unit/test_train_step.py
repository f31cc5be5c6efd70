"""The plain training step without Ray: it learns on real images, refuses non-finite values
before the optimizer step, and checkpoints are only read once committed."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import helpers  # noqa: E402
from helpers import plain_state  # noqa: E402
from sfumato.config import OptimizerConfig  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.train.step import NonFiniteError, lr_at, train_step  # noqa: E402


@pytest.fixture(scope="module")
def cifar_batch(cifar_dir):
    return helpers.cifar_batch(cifar_dir, 0, 32, _classes_of_first(cifar_dir, 32))


@pytest.fixture(scope="module")
def held_out_batch(cifar_dir):
    """16 other images (of classes cifar_batch does not have: they go in unconditioned)."""
    return helpers.cifar_batch(cifar_dir, 32, 48, _classes_of_first(cifar_dir, 32))


def _classes_of_first(cifar_dir, count: int) -> list[str]:
    return sorted({p.parent.name for p in sorted(cifar_dir.rglob("*.jpg"))[:count]})


def test_loss_decreases_on_real_images_and_the_validation_loss_is_a_fixed_yardstick(cifar_batch, held_out_batch):
    from dataclasses import replace

    from sfumato.config import DiffusionConfig
    from sfumato.train.step import validate

    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 16, 3, num_classes=10)
    state = plain_state(model, null_class=10)
    val_before = validate(model, [held_out_batch], state, num_timesteps=8, seed=0)
    # Fixed noise and timesteps, no dropout or weighting: the same number for the same weights,
    # whatever the run's Min-SNR gamma or condition dropout (what a sweep varies).
    other = replace(state, diffusion_cfg=DiffusionConfig(min_snr_gamma=None, condition_dropout=0.5),
                    generator=torch.Generator().manual_seed(123))
    assert validate(model, [held_out_batch], other, num_timesteps=8, seed=0) == val_before
    losses = [train_step(state, cifar_batch)["loss"] for _ in range(60)]
    assert state.step == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    val_after = validate(model, [held_out_batch], state, num_timesteps=8, seed=0)
    assert val_after < 0.8 * val_before, "the model also improves on images it never trained on"


def test_non_finite_loss_stops_before_the_optimizer_step(cifar_batch):
    model = build_denoiser("unet-tiny", 16, 3)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    state = plain_state(model)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 0"):
        train_step(state, cifar_batch)
    after = list(model.parameters())
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all()) for a, b in zip(before, after))
    assert state.step == 0


def test_non_finite_gradient_is_caught_by_the_watch(cifar_batch):
    model = build_denoiser("unet-tiny", 16, 3)
    param = next(model.parameters())
    param.register_hook(lambda g: g * float("inf"))  # a finite loss whose gradient overflows
    state = plain_state(model)
    start = param.detach().clone()
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        train_step(state, cifar_batch)
    assert torch.equal(param.detach(), start), "no optimizer step was taken"


def test_warmup_then_cosine():
    opt = OptimizerConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, opt, 110) == pytest.approx(0.1)
    assert lr_at(9, opt, 110) == pytest.approx(1.0)
    assert lr_at(60, opt, 110) == pytest.approx(0.55)
    assert lr_at(110, opt, 110) == pytest.approx(0.1)


def test_half_written_checkpoint_is_never_loaded_and_retention_keeps_the_last(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    state = {"w": torch.ones(3)}
    for step in (5, 10, 15):
        ckpt.partial_dir(checkpoints, step).mkdir(parents=True)
        ckpt.commit(checkpoints, step, state, {"step": step}, num_to_keep=2)
    assert [p.name for p in ckpt.committed(checkpoints)] == ["step-00000010", "step-00000015"]
    # A crash mid-write: a folder without the marker, and a .partial one.
    (checkpoints / "step-00000020").mkdir()
    (checkpoints / "step-00000020" / "ema.safetensors").write_bytes(b"half")
    ckpt.partial_dir(checkpoints, 25).mkdir()
    assert ckpt.latest(checkpoints).name == "step-00000015"
    assert json.loads((ckpt.latest(checkpoints) / "meta.json").read_text())["step"] == 15
    ckpt.clean_partials(checkpoints)
    assert not ckpt.partial_dir(checkpoints, 25).exists()
    ckpt.partial_dir(checkpoints, 30).mkdir()
    ckpt.commit(checkpoints, 30, state, {"step": 30}, num_to_keep=1)
    assert [p.name for p in ckpt.committed(checkpoints)] == ["step-00000030"]


def test_weights_that_do_not_fit_the_model_are_refused_naming_the_source():
    from sfumato.models.run import fill_parameters

    model = build_denoiser("unet-tiny", 16, 3)
    weights = {name: p.detach().clone() + 1 for name, p in model.named_parameters()}
    fill_parameters(model, weights, "ema.safetensors")
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    first = next(iter(weights))
    with pytest.raises(ValueError, match=r"ema\.safetensors does not fit the model: missing \['" + first):
        fill_parameters(model, {k: v for k, v in weights.items() if k != first}, "ema.safetensors")
    with pytest.raises(ValueError, match=r"ema\.safetensors: .* has shape \(1,\)"):
        fill_parameters(model, {**weights, first: torch.zeros(1)}, "ema.safetensors")

"""The plain training step without Ray: it learns on real images, refuses non-finite values
before the optimizer step, and checkpoints are only read once committed."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import helpers  # noqa: E402
from helpers import plain_state  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.config import OptimizerConfig  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402
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
    other = replace(
        state,
        diffusion_cfg=DiffusionConfig(min_snr_gamma=None, condition_dropout=0.5),
        generator=torch.Generator().manual_seed(123),
    )
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


@pytest.mark.slow  # inductor compiles the forward and backward: about a minute on 2 cores
def test_compiled_step_matches_the_eager_step_and_still_catches_non_finite_gradients(cifar_batch):
    """train.compile changes the speed, not the training: the same losses and weights as eager
    to float tolerance, the same parameter names (checkpoints and the EMA read them), and the
    gradient watch still sees a non-finite gradient through the compiled backward."""
    from types import SimpleNamespace

    from sfumato.train.worker import speed_up

    def run(compiled: bool):
        from sfumato.train.step import batch_to_tensors, loss_fn

        torch.manual_seed(0)
        model = build_denoiser("unet-tiny", 16, 3, num_classes=10)
        names = [n for n, _ in model.named_parameters()]
        speed_up(model, SimpleNamespace(compile=compiled, channels_last=None), torch.device("cpu"))
        state = plain_state(model, null_class=10)
        x0, classes = batch_to_tensors(cifar_batch, state.device, state.dtype)
        loss_fn(model, x0, classes, state)[0].backward()  # the same noise and times: one generator seed
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        losses = [float(train_step(state, cifar_batch)["loss"]) for _ in range(3)]
        return model, names, grads, losses

    eager, eager_names, eager_grads, eager_losses = run(False)
    compiled, compiled_names, compiled_grads, compiled_losses = run(True)
    assert compiled._compiled_call_impl is None and compiled.net._compiled_call_impl is not None
    assert compiled_names == eager_names
    for name, a, b in zip(eager_names, eager_grads, compiled_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), name
    # Adam's steps amplify last-digit differences of near-zero gradients: compare the losses.
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)
    param = next(compiled.parameters())
    param.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        train_step(plain_state(compiled, null_class=10), cifar_batch)


def test_a_nan_in_the_first_micro_batch_stops_at_the_accumulation_boundary_before_any_update(cifar_batch):
    """The finite flags stay on the device over the micro-steps and are read once, at the
    boundary: a NaN loss in micro-batch 1 of 2 still stops the run before the optimizer step."""
    torch.manual_seed(0)
    model = build_denoiser("unet-tiny", 16, 3)
    state = plain_state(model)
    state.engine.grad_accum_steps = 2
    before = [p.detach().clone() for p in model.parameters()]
    weight = next(model.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    out = train_step(state, cifar_batch)  # micro-step 1: NaN loss, no boundary, no error yet
    assert not out["optimizer_step"] and torch.isnan(out["loss"])
    with torch.no_grad():
        weight.copy_(saved)  # micro-step 2 is finite, the NaN of micro-step 1 is remembered
    with pytest.raises(NonFiniteError, match="non-finite loss at step 0"):
        train_step(state, cifar_batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "no update was applied"

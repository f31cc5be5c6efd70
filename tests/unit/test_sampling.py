"""Sampling: every sampler runs on the run's schedule, an image depends only on its own seed,
classifier-free guidance combines the two passes (inside a guidance interval only, when given),
and bad conditions fail before any work."""

import typing

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.config import DiffusionConfig, Sampler  # noqa: E402
from sfumato.diffusion.pipeline import SfumatoPipeline  # noqa: E402
from sfumato.diffusion.sample import SAMPLERS, make_sampler, sample  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402


def _pipe(sampler="ddim", classes=3):
    torch.manual_seed(0)
    denoiser = build_denoiser("unet-tiny", 16, 3, classes).eval()
    # v-prediction keeps an untrained net's x0 estimate bounded (epsilon's is divided by
    # sqrt(abar_T) ~ 0), so the images are not all clipped to 0 and 1 and samplers can differ.
    diffusion = DiffusionConfig(
        prediction_type="v_prediction", objective="flow" if sampler.startswith("flow-") else "ddpm"
    )
    pipe = SfumatoPipeline(
        unet=denoiser.net,
        scheduler=make_sampler(diffusion, sampler),
        class_names=[f"class{i}" for i in range(classes)] if classes else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_config_offers_exactly_the_registered_samplers():
    assert set(typing.get_args(Sampler)) == set(SAMPLERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_image_depends_on_its_seed_only_not_on_its_batch(sampler):
    pipe = _pipe(sampler)
    four = sample(pipe, 4, seed=7, steps=6, guidance_scale=2.0, conditions=[0, 1, 2, 0])
    assert four.shape == (4, 3, 16, 16) and 0 <= float(four.min()) and float(four.max()) <= 1
    last_two = sample(pipe, 2, seed=7, steps=6, guidance_scale=2.0, conditions=[2, 0], first_index=2)
    # Equal up to float rounding: a batch of 4 and one of 2 may take different CPU kernels.
    assert torch.allclose(four[2:], last_two, atol=1e-5), "image i starts from seed + i whatever batch it is in"
    other_seed = sample(pipe, 4, seed=8, steps=6, guidance_scale=2.0, conditions=[0, 1, 2, 0])
    assert not torch.equal(four, other_seed)


def test_samplers_differ_and_names_resolve_to_their_classes():
    images = {name: sample(_pipe(name), 2, 0, 6, conditions=[0, 1]) for name in SAMPLERS}
    assert not torch.equal(images["ddpm"], images["ddim"])
    assert not torch.equal(images["ddim"], images["dpm-solver++"])
    assert not torch.equal(images["flow-euler"], images["flow-heun"])
    assert (
        type(make_sampler(DiffusionConfig(objective="flow"), "flow-heun")).__name__ == "FlowMatchHeunDiscreteScheduler"
    )
    with pytest.raises(ValueError, match="does not fit a flow-matching model"):
        make_sampler(DiffusionConfig(objective="flow"), "ddim")
    with pytest.raises(ValueError, match="does not fit a DDPM model"):
        make_sampler(DiffusionConfig(), "flow-euler")
    assert type(make_sampler(DiffusionConfig(), "dpm-solver++")).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(KeyError, match="unknown sampler 'euler'"):
        make_sampler(DiffusionConfig(), "euler")


def test_guidance_extrapolates_from_the_unconditional_to_the_conditional_prediction():
    pipe = _pipe()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one_step = dict(num_inference_steps=1, output_type="latent", latents=x)
    cond = pipe(class_labels=[0, 1], guidance_scale=1.0, **one_step).images
    uncond = pipe(class_labels=None, batch_size=2, guidance_scale=1.0, **one_step).images
    guided = pipe(class_labels=[0, 1], guidance_scale=3.0, **one_step).images
    # DDIM's update is affine in the prediction, so the guided step is the same extrapolation.
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
    assert torch.equal(pipe(class_labels=["class0", "class1"], guidance_scale=1.0, **one_step).images, cond)


def test_bad_conditions_fail_naming_what_is_wrong():
    pipe = _pipe()
    with pytest.raises(ValueError, match="outside 0..2"):
        pipe(class_labels=[3], num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        pipe(class_labels=["dog"], num_inference_steps=1)
    with pytest.raises(ValueError, match="not text-conditional"):
        pipe(prompt="a dog", num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(class_labels=[0], height=15, width=16, num_inference_steps=1)
    unconditional = _pipe(classes=None)
    with pytest.raises(ValueError, match="guidance_scale needs a conditional model"):
        unconditional(batch_size=1, guidance_scale=2.0, num_inference_steps=1)
    assert unconditional(batch_size=2, num_inference_steps=2, output_type="pt").images.shape == (2, 3, 16, 16)


def _levels(pipe, steps: int) -> list[float]:
    """The noise level t / num_train_timesteps (1: pure noise) of each of the sampler's steps."""
    pipe.scheduler.set_timesteps(steps)
    return [t.item() / pipe.scheduler.config.num_train_timesteps for t in pipe.scheduler.timesteps]


def _rows_per_call(pipe) -> list[tuple[float, int]]:
    """(noise level, images in the batch) of every call of the pipeline's network, as it runs."""
    calls = []

    def record(module, args, kwargs):
        sample, timestep = args[:2] if len(args) > 1 else (args[0], kwargs["timestep"])
        calls.append((timestep[0].item() / pipe.scheduler.config.num_train_timesteps, sample.shape[0]))

    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    return calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_in_an_interval_spends_the_second_call_only_on_its_noise_levels(sampler):
    """Kynkäänniemi et al. 2024: [0, 1] is plain guidance, bit for bit; an interval that holds no
    step is no guidance, bit for bit; a middle one guides (two images a call) exactly at the steps
    whose noise level lies in it, one image a call elsewhere, and draws images unlike both."""
    pipe, steps, n = _pipe(sampler), 6, 3
    levels = _levels(pipe, steps)
    guided = dict(guidance_scale=3.0, conditions=[0, 1, 2])
    plain = sample(pipe, n, 7, steps, **guided)
    assert torch.equal(sample(pipe, n, 7, steps, **guided, guidance_interval=(0.0, 1.0)), plain)

    distinct = sorted(set(levels))
    gap = (distinct[0] + distinct[1]) / 2  # between the two lowest noise levels: no step there
    unguided = sample(pipe, n, 7, steps, guidance_scale=1.0, conditions=[0, 1, 2])
    assert not torch.equal(plain, unguided), "guidance changes these images: the checks below can tell"
    assert torch.equal(sample(pipe, n, 7, steps, **guided, guidance_interval=(gap, gap)), unguided)

    middle = (distinct[1], distinct[-2])  # every level but the lowest and the highest
    calls = _rows_per_call(pipe)
    limited = sample(pipe, n, 7, steps, **guided, guidance_interval=middle)
    assert [level for level, _ in calls] == levels, "one network call per timestep (Heun: two a step but the last)"
    for level, rows in calls:
        assert rows == (2 * n if middle[0] <= level <= middle[1] else n), (level, rows, middle)
    rows = sum(rows for _, rows in calls)
    assert n * len(levels) < rows < 2 * n * len(levels), "fewer network evaluations than guiding every step"
    assert not torch.equal(limited, plain) and not torch.equal(limited, unguided)


def test_a_guidance_interval_outside_zero_to_one_or_reversed_is_refused():
    pipe = _pipe()
    for interval in ((0.8, 0.2), (-0.1, 0.5), (0.5, 1.5), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="guidance_interval must be"):
            pipe(class_labels=[0], guidance_scale=2.0, guidance_interval=interval, num_inference_steps=1)

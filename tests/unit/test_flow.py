"""Rectified flow matching: the loss is its formula, times follow the configured distribution and
shift, and with the exact velocity field of Gaussian data the Euler and Heun samplers of the
pipeline land on that distribution."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import ModelMixin  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

from sfumato.config import ConfigError, DiffusionConfig, FlowConfig  # noqa: E402
from sfumato.diffusion import flow  # noqa: E402
from sfumato.diffusion.loss import diffusion_loss, validation_loss  # noqa: E402
from sfumato.diffusion.pipeline import SfumatoPipeline  # noqa: E402
from sfumato.diffusion.sample import make_sampler  # noqa: E402
from sfumato.diffusion.schedule import NoiseSchedule  # noqa: E402

FLOW = DiffusionConfig(objective="flow", flow=FlowConfig(timestep_sampling="uniform"))


def test_loss_equals_the_rectified_flow_formula():
    x0 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def net(x_t, time, cond):
        seen.update(x_t=x_t, time=time)
        return torch.zeros_like(x_t) + 0.3

    schedule = NoiseSchedule.from_config(FLOW)
    loss, _ = diffusion_loss(net, x0, None, schedule, FLOW, torch.Generator().manual_seed(1))
    # The same draws, by hand: t ~ U(0, 1) first, then the noise.
    g = torch.Generator().manual_seed(1)
    t = torch.rand(5, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.allclose(seen["time"], t * 1000)
    assert torch.allclose(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    assert loss.item() == pytest.approx(((0.3 - (eps - x0)) ** 2).mean().item(), rel=1e-5)


def test_a_perfect_velocity_gives_zero_loss_and_validation_loss():
    x0 = torch.randn(4, 3, 8, 8)
    oracle = lambda x_t, time, cond: (x_t - x0) / (time / 1000).view(-1, 1, 1, 1)  # noqa: E731  = eps - x0
    schedule = NoiseSchedule.from_config(FLOW)
    loss, _ = diffusion_loss(oracle, x0, None, schedule, FLOW, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert validation_loss(oracle, x0, None, schedule, FLOW, 4, torch.Generator().manual_seed(0)).max() < 1e-8


def test_training_times_follow_logit_normal_and_the_resolution_shift():
    cfg = FlowConfig(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    t = flow.sample_times(40_000, cfg, 32, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)  # sigmoid(N(0, 1)) is symmetric about 1/2
    logits = torch.logit(t.double())
    assert logits.std().item() == pytest.approx(1.0, abs=0.02)
    shifted = FlowConfig(timestep_sampling="logit_normal", shift=1.0, shift_base_px=16)
    assert shifted.shift_at(64) == 4.0
    t64 = flow.sample_times(40_000, shifted, 64, torch.Generator().manual_seed(0))
    # t' = s t / (1 + (s - 1) t) is monotone: the median moves to s/2 / (1 + (s-1)/2).
    assert t64.median().item() == pytest.approx(4 * 0.5 / (1 + 3 * 0.5), abs=0.01)
    assert torch.allclose(t64, flow.shift_times(t, 4.0), atol=1e-6)


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact marginal velocity E[eps - x0 | x_t] for data x0 ~ N(mean, std^2 I)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 4,
        in_channels: int = 3,
        mean: float = 0.5,
        std: float = 0.2,
        block_out_channels: tuple = (4,),
    ):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the pipeline has a dtype

    def forward(self, x, time):
        t = (time.float() / 1000).view(-1, 1, 1, 1)
        m, s = self.config.mean, self.config.std
        var = (1 - t) ** 2 * s**2 + t**2
        centred = x - (1 - t) * m
        e_x0 = m + (1 - t) * s**2 / var * centred
        e_eps = t / var * centred
        return BaseOutput(sample=e_eps - e_x0)


@pytest.mark.parametrize("sampler,steps", [("flow-euler", 64), ("flow-heun", 16)])
def test_samplers_with_the_exact_velocity_land_on_the_data_distribution(sampler, steps):
    pipe = SfumatoPipeline(unet=GaussianVelocity(), scheduler=make_sampler(FLOW, sampler))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    x = pipe(batch_size=2000, num_inference_steps=steps, generator=generator, output_type="latent").images
    assert x.mean().item() == pytest.approx(0.5, abs=0.01)
    assert x.std().item() == pytest.approx(0.2, abs=0.01)
    # Too few Euler steps visibly miss; Heun's second order is what lets it use fewer.
    coarse = pipe(
        batch_size=2000, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    assert abs(coarse.std().item() - 0.2) > abs(x.std().item() - 0.2)


def test_the_config_refuses_samplers_that_do_not_fit_the_objective(tmp_path):
    from sfumato.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text((__import__("pathlib").Path(__file__).parents[2] / "configs" / "debug.yaml").read_text())
    cfg = load_config(path, ["diffusion.objective=flow"])
    assert cfg.train.sample.sampler == cfg.evaluate.sampler == cfg.export.sampler == "flow-euler"
    assert load_config(path, ["diffusion.objective=flow", "export.sampler=flow-heun"]).export.sampler == "flow-heun"
    with pytest.raises(ConfigError, match="evaluate.sampler=dpm-solver\\+\\+ does not fit diffusion.objective=flow"):
        load_config(path, ["diffusion.objective=flow", "evaluate.sampler=dpm-solver++"])
    with pytest.raises(ConfigError, match="train.sample.sampler=flow-euler does not fit diffusion.objective=ddpm"):
        load_config(path, ["train.sample.sampler=flow-euler"])
    # The quality watched during training draws with a sampler too (train.quality): the same rules.
    watched = load_config(path, ["diffusion.objective=flow", "train.quality={every_steps: 5}"])
    assert watched.train.quality.sampler == "flow-euler"
    assert load_config(path, ["train.quality={every_steps: 5}"]).train.quality.sampler == "dpm-solver++"
    with pytest.raises(ConfigError, match="train.quality.sampler=dpm-solver\\+\\+ does not fit"):
        load_config(path, ["diffusion.objective=flow", "train.quality={every_steps: 5, sampler: dpm-solver++}"])

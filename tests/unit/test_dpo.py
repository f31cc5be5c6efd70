"""Diffusion-DPO's loss (sfumato.diffusion.dpo) for each objective sfumato trains: log 2 while the
policy is the reference, its gradient moves the policy's error on the chosen image down relative
to the rejected one, and the reference gets no gradient and never changes."""

import copy
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import UNet2DModel  # noqa: E402

from sfumato.config import DiffusionConfig, FlowConfig  # noqa: E402
from sfumato.diffusion.dpo import denoising_errors, dpo_loss, draw_times_and_noise, pair_loss  # noqa: E402
from sfumato.diffusion.schedule import NoiseSchedule  # noqa: E402

OBJECTIVES = {
    "epsilon": DiffusionConfig(prediction_type="epsilon"),
    "v": DiffusionConfig(prediction_type="v_prediction"),
    "flow": DiffusionConfig(objective="flow", flow=FlowConfig(timestep_sampling="uniform")),
}


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def _denoiser(net):
    return lambda x_t, t, cond: net(x_t, t).sample


def _pairs(count: int = 6):
    g = torch.Generator().manual_seed(3)
    chosen = torch.rand(count, 3, 8, 8, generator=g) * 2 - 1
    return chosen, (torch.rand(count, 3, 8, 8, generator=g) * 2 - 1)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_with_the_policy_equal_to_the_reference_every_pair_loss_is_log_2(objective):
    cfg, net = OBJECTIVES[objective], _net()
    schedule = NoiseSchedule.from_config(cfg)
    chosen, rejected = _pairs()
    t, noise = draw_times_and_noise(chosen, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        e_w = denoising_errors(_denoiser(net), chosen, None, t, noise, schedule, cfg)
        e_l = denoising_errors(_denoiser(net), rejected, None, t, noise, schedule, cfg)
    losses, stats = dpo_loss(e_w, e_l, e_w.clone(), e_l.clone(), beta=5000.0)
    assert losses.shape == (6,) and torch.allclose(losses, torch.full((6,), math.log(2)))
    assert stats["reward_margin"] == 0
    mean, _ = pair_loss(
        _denoiser(net),
        _denoiser(copy.deepcopy(net)),
        chosen,
        rejected,
        None,
        schedule,
        cfg,
        5000.0,
        torch.Generator().manual_seed(0),
    )
    assert mean.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_training_lowers_the_policys_error_on_chosen_relative_to_rejected_and_leaves_the_reference(objective):
    cfg, policy = OBJECTIVES[objective], _net()
    reference = copy.deepcopy(policy).requires_grad_(False)
    frozen = {n: p.clone() for n, p in reference.named_parameters()}
    schedule = NoiseSchedule.from_config(cfg)
    chosen, rejected = _pairs()

    def gap() -> float:
        """Policy error on chosen minus on rejected, at fixed draws (the same pairs, t and noise)."""
        t, noise = draw_times_and_noise(chosen, cfg, torch.Generator().manual_seed(11))
        with torch.no_grad():
            e_w = denoising_errors(_denoiser(policy), chosen, None, t, noise, schedule, cfg)
            e_l = denoising_errors(_denoiser(policy), rejected, None, t, noise, schedule, cfg)
        return float((e_w - e_l).mean())

    before = gap()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(12):  # gradient descent on one fixed draw of t and noise
        loss, _ = pair_loss(
            _denoiser(policy),
            _denoiser(reference),
            chosen,
            rejected,
            None,
            schedule,
            cfg,
            beta=500.0,
            generator=torch.Generator().manual_seed(11),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gap() < before - 1e-4, f"the chosen-minus-rejected error gap did not fall: {before} -> {gap()}"
    with torch.no_grad():
        after, _ = pair_loss(
            _denoiser(policy),
            _denoiser(reference),
            chosen,
            rejected,
            None,
            schedule,
            cfg,
            beta=500.0,
            generator=torch.Generator().manual_seed(11),
        )
    assert after.item() < math.log(2), "at the fixed draws the loss fell below its starting value, log 2"
    assert all(p.grad is None for p in reference.parameters()), "the reference got a gradient"
    assert all(torch.equal(p, frozen[n]) for n, p in reference.named_parameters()), "the reference changed"

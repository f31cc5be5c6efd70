"""Noise schedules, Min-SNR-gamma weights and the EMA update against their formulas."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.config import DiffusionConfig  # noqa: E402
from sfumato.diffusion.loss import diffusion_loss, drop_conditions, min_snr_weight, sample_noise  # noqa: E402
from sfumato.diffusion.schedule import NoiseSchedule  # noqa: E402
from sfumato.train.ema import EMA, ema_beta  # noqa: E402


def test_cosine_schedule_follows_nichol_dhariwal():
    sched = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-3)


def test_linear_schedule_and_zero_terminal_snr():
    linear = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="linear"))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(linear.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5)
    ztsnr = NoiseSchedule.from_config(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    assert ztsnr.snr(torch.tensor([999])).item() == 0.0
    assert (ztsnr.alphas_cumprod[1:] < ztsnr.alphas_cumprod[:-1]).all()


def test_v_target_is_salimans_ho():
    sched = NoiseSchedule.from_config(DiffusionConfig())
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = sched.target(x0, noise, t, "v_prediction")
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    # x0 is recovered from x_t and v: x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    x_t = sched.add_noise(x0, noise, t)
    assert torch.allclose(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_equals_capped_x0_weighting(prediction_type):
    """w * ||target error||^2 must equal min(SNR, gamma) * ||x0 error||^2 for any prediction."""
    sched = NoiseSchedule.from_config(DiffusionConfig())
    t = torch.tensor([1, 50, 200, 600, 990])
    x0, noise = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x_t = sched.add_noise(x0, noise, t)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = sched.target(x0, noise, t, prediction_type)
    prediction = target + 0.1 * torch.randn_like(target)
    if prediction_type == "epsilon":
        x0_hat = (x_t - (1 - abar).sqrt() * prediction) / abar.sqrt()
    else:
        x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * prediction
    snr = sched.snr(t)
    lhs = min_snr_weight(snr, 5.0, prediction_type) * (prediction - target).pow(2).sum((1, 2, 3))
    rhs = torch.clamp(snr, max=5.0) * (x0_hat - x0).pow(2).sum((1, 2, 3))
    assert torch.allclose(lhs, rhs, rtol=1e-6)
    assert (min_snr_weight(snr, None, prediction_type) == 1).all()


def test_noise_offset_shifts_channel_means():
    x0 = torch.zeros(512, 3, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    spread = lambda n: n.mean((2, 3)).std().item()  # noqa: E731  (plain: 1/16 over 256 px)
    assert spread(plain) < 0.1 and spread(offset) == pytest.approx(0.5, rel=0.15)


def test_condition_dropout_rate():
    mask = drop_conditions(20000, 0.1, torch.Generator().manual_seed(0))
    assert mask.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert not drop_conditions(10, 0.0, None).any()


def test_loss_is_zero_for_a_perfect_denoiser_and_deterministic():
    cfg = DiffusionConfig(prediction_type="epsilon", noise_offset=0.0)
    sched = NoiseSchedule.from_config(cfg)
    x0 = torch.randn(6, 3, 8, 8)
    seen = {}

    def oracle(x_t, t, cond):  # knows x0, so it can give back exactly the noise
        abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        seen["t"] = t
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    loss, _ = diffusion_loss(oracle, x0, None, sched, cfg, torch.Generator().manual_seed(1))
    assert loss.item() < 1e-6
    a, _ = diffusion_loss(lambda x, t, c: x, x0, None, sched, cfg, torch.Generator().manual_seed(3))
    b, _ = diffusion_loss(lambda x, t, c: x, x0, None, sched, cfg, torch.Generator().manual_seed(3))
    assert a.item() == b.item() > 0


def test_ema_update_matches_formula_and_half_life():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, beta=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, s in zip(ema.params, start):
        assert torch.allclose(e, 0.9 * s + 0.1 * (s + 1.0))
    # A half-life of 1000 samples at 100 samples per step: after 10 steps the start weighs 0.5.
    beta = ema_beta(None, 1000, 100)
    assert beta**10 == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ema_beta(0.99, 1000, 100)


def test_ema_state_round_trips_by_parameter_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    ema = EMA(model, beta=0.5)
    state = ema.state_dict(model)
    assert set(state) == {n for n, _ in model.named_parameters()}
    other = EMA(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)), beta=0.5)
    other.load_state_dict(model, state)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    other.copy_to(target)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), model.parameters()))


def test_ema_reads_frozen_parameters_instead_of_averaging_copies():
    """A frozen parameter (a pretrained text encoder) is never copied or averaged, yet the state
    holds its value, so a checkpoint's EMA weights are still the whole model; with trainable_only
    (LoRA) the state holds the trainable ones alone."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    ema = EMA(model, beta=0.5)
    assert ema.names == ["1.weight", "1.bias"] and len(ema.params) == 2
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    state = ema.state_dict(model)
    assert set(state) == {n for n, _ in model.named_parameters()}
    assert torch.equal(state["0.weight"], start[0]) and torch.allclose(state["1.weight"], start[2] + 0.5)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    ema.copy_to(target)
    assert all(torch.equal(a, state[n]) for n, a in target.named_parameters())
    fresh = EMA(model, beta=0.5)
    fresh.load_state_dict(model, state)
    assert torch.equal(fresh.params[0], state["1.weight"])
    assert set(EMA(model, 0.5, trainable_only=True).state_dict(model)) == {"1.weight", "1.bias"}

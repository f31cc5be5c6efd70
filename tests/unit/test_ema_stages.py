"""The EMA's half-life in images holds across curriculum stages whose effective batch differs
(configs/debug.yaml: 16 images per step at 16 px, then 8 at 32 px), for a half-life in images
and for a fixed per-step decay alike."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from sfumato.config import load_config  # noqa: E402
from sfumato.train.ema import EMA, halflife_images, stage_beta  # noqa: E402

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


def _images_until_half_absorbed(beta: float, images_per_step: int) -> int:
    """Images until the EMA of a weight that jumps from 0 to 1 has come half way."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, beta)
    with torch.no_grad():
        model.weight.fill_(1.0)
    steps = 0
    while ema.params[0].item() < 0.5:
        ema.update(model)
        steps += 1
    return steps * images_per_step


@pytest.mark.parametrize(
    "overrides, halflife",
    [
        ([], 500.0),  # train.ema.halflife_samples: 500
        (["train.ema.halflife_samples=null", "train.ema.decay=0.99"], 12.8 * 68.97),  # mean batch 12.8 x ln.5/ln.99
    ],
)
def test_halflife_in_images_is_the_same_before_and_after_a_stage_that_halves_the_batch(overrides, halflife):
    t = load_config(DEBUG, overrides, inputs=False).train
    first, second = t.stages
    assert t.effective_batch(first) == 16 and t.effective_batch(second) == 8
    betas = [stage_beta(t, stage) for stage in t.stages]
    assert betas[0] < betas[1], "the stage with half the batch forgets less per step"
    for beta, stage in zip(betas, t.stages):
        batch = t.effective_batch(stage)
        assert halflife_images(beta, batch) == pytest.approx(halflife, rel=1e-3)
        # Measured on the EMA itself: half absorbed within one step's images of the half-life.
        assert abs(_images_until_half_absorbed(beta, batch) - halflife) <= batch

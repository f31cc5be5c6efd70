"""`sfumato bench models`'s counting: every preset in the table, its parameters those of a real
build, its FLOPs the DiT's closed form (attention included), and the CPU step's timers. A
bench's own test."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.bench import models as bench  # noqa: E402
from sfumato.models.dit import SfumatoDiT, swiglu_width  # noqa: E402
from sfumato.models.names import MODEL_FAMILIES, TRANSFORMERS  # noqa: E402
from sfumato.models.registry import MODELS  # noqa: E402


def test_the_table_lists_every_registered_preset_dits_first():
    names = bench.preset_names()
    assert sorted(names) == sorted(MODEL_FAMILIES) and len(names) == len(set(names))
    assert set(names[: len(TRANSFORMERS)]) == TRANSFORMERS


@pytest.mark.parametrize("name", ["dit-xs", "dit-text-xs", "mmdit-xs", "unet-xs", "unet-text-xs"])
def test_a_row_counts_the_parameters_of_a_real_build(name):
    """Counted on the meta device, the same number as the weights a real build allocates."""
    row = bench.preset_row(name)
    torch.manual_seed(0)
    net = MODELS[name](bench.RESOLUTION_PX // bench.VAE_DOWNSAMPLE, bench.LATENT_CHANNELS, bench.conditioning(name))
    assert row.parameters == sum(p.numel() for p in net.parameters())
    assert row.training_flops == 3 * row.forward_flops > 0


def _dit_on_meta(depth: int, hidden: int, heads: int, side: int, text: str | None) -> torch.nn.Module:
    with torch.device("meta"):
        return SfumatoDiT(
            in_channels=bench.LATENT_CHANNELS,
            sample_size=side,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_class_embeds=None if text else bench.CLASSES + 1,
            cross_attention_dim=bench.CAPTION_WIDTH if text else None,
            text_attention=text or "cross",
        )


@pytest.mark.parametrize("text", [None, "cross", "joint"])
def test_counted_flops_follow_the_closed_form_in_depth_width_and_tokens(text):
    """The counter and the formula agree for every shape (depth, width, heads, tokens); doubling
    the depth doubles what the blocks cost; the heads split the width, not the work."""
    counts = {}
    for depth, hidden, heads, side in [(2, 64, 2, 8), (4, 64, 2, 8), (2, 128, 4, 8), (2, 128, 8, 8), (2, 64, 2, 16)]:
        net = _dit_on_meta(depth, hidden, heads, side, text)
        counted = bench.forward_flops(net, side, bench.LATENT_CHANNELS, text is not None)
        tokens = (side // 2) ** 2
        assert counted == bench.dit_forward_flops(depth, hidden, tokens, swiglu_width(hidden, 4.0), text)
        counts[depth, hidden, heads, side] = counted
    outside = bench.dit_forward_flops(0, 64, 16, swiglu_width(64, 4.0), text)
    assert counts[4, 64, 2, 8] - outside == 2 * (counts[2, 64, 2, 8] - outside)
    assert counts[2, 128, 4, 8] == counts[2, 128, 8, 8]


def test_the_meta_count_includes_the_attention_the_cpu_kernel_hides():
    """On the CPU torch's fused SDPA kernel is outside the counter's registry: a real CPU forward
    counts every product but attention's 4 T^2 d per block, which the meta count has."""
    from torch.utils.flop_counter import FlopCounterMode

    depth, hidden, heads, side = 2, 64, 2, 8
    meta = bench.forward_flops(_dit_on_meta(depth, hidden, heads, side, None), side, bench.LATENT_CHANNELS, False)
    net = SfumatoDiT(in_channels=4, sample_size=side, hidden_size=hidden, depth=depth, num_heads=heads)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 4, side, side), torch.tensor([500]))
    tokens = (side // 2) ** 2
    assert meta - counter.get_total_flops() == depth * 4 * tokens * tokens * hidden


def test_dit_xl_has_the_published_size_and_cost():
    """DiT-XL/2 (Peebles & Xie 2023, table 4): 675 M parameters, 118.6 GFLOPs at 256 px counted as
    multiply-adds, i.e. 237.2 G at 2 FLOPs each; the SwiGLU at 2/3 width keeps both."""
    row = bench.preset_row("dit-xl")
    assert round(row.parameters / 1e6) == 675
    assert row.forward_flops / 2 / 1e9 == pytest.approx(118.6, rel=0.005)


def test_the_cpu_step_timers_train_class_and_text_models_with_routing_on():
    from sfumato.config import TextConfig

    text_cfg = TextConfig(max_length=8, hidden_size=32, num_layers=1, num_heads=2, vocab_size=300)
    timers = [bench.StepTimer("dit-tiny", text_cfg), bench.StepTimer("dit-text-tiny", text_cfg, routing=(0.5, 0, -1))]
    for timer in timers:
        before = [p.detach().clone() for p in timer.engine.module.net.parameters()]
        timer.step(timed=False)
        timer.step()
        after = list(timer.engine.module.net.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), f"{timer.label} did not train"
        assert len(timer.seconds) == len(timer.cpu_seconds) == 1 and timer.ms_per_step > 0
    routed = timers[1].engine.module.net
    assert routed.training and routed.routing == (0.5, 0, 1)  # dit-tiny has 2 blocks: end -1 is block 1
    assert timers[1].encoder_parameters > 0 and timers[0].encoder_parameters == 0

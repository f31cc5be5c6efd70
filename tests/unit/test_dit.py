"""sfumato's DiT (sfumato.models.dit): its presets, rotary positions, conditioning and token routing."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, plain_state
from sfumato.models.dit import SfumatoDiT, rope_angles, rotate
from sfumato.models.registry import DIT_SIZES, MODELS, build_denoiser


def _awake(net: torch.nn.Module) -> torch.nn.Module:
    """adaLN-zero starts every block (and the output) at zero: give them something to say."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def _count(name: str, **cond) -> int:
    with torch.device("meta"):
        net = MODELS[name](256, 4, **cond)
    return sum(p.numel() for p in net.parameters())


def test_the_presets_have_dits_sizes():
    # DiT-S/2, B/2, L/2, XL/2 at 256 px in SD's 4-channel latent space, 1000 classes: Peebles &
    # Xie's 33 M, 130 M, 458 M and 675 M, give or take the SwiGLU (2/3 of a 4x MLP's width,
    # rounded up to 32) and QK-norm; the tiny test model stays tiny.
    counts = {size: _count(f"dit-{size}", cond=1000) / 1e6 for size in DIT_SIZES}
    for size, paper in (("s", 33), ("b", 130), ("l", 458), ("xl", 675)):
        assert abs(counts[size] - paper) / paper < 0.05, (size, counts[size])
    assert counts["tiny"] < 0.3 and 3 < counts["xs"] < 6
    # Text by joint attention carries a second set of block weights for the caption's stream.
    cross, joint = _count("dit-text-s", cond=768), _count("mmdit-s", cond=768)
    assert 1.5 < joint / cross < 2.0


def test_rotary_attention_depends_on_offsets_only_at_any_grid():
    """The same relative offset gives the same query-key score on a 4x4 grid and an 8x12 one:
    positions need no table, so a 16 px stage's weights mean the same at 32 px."""
    torch.manual_seed(0)
    head_dim = 16
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(rows, columns, a, b):
        cos, sin = rope_angles(rows, columns, head_dim, 10000.0, "cpu")
        ia, ib = a[0] * columns + a[1], b[0] * columns + b[1]
        qa = rotate(q.view(1, 1, 1, -1), cos[:, :, ia : ia + 1], sin[:, :, ia : ia + 1])
        kb = rotate(k.view(1, 1, 1, -1), cos[:, :, ib : ib + 1], sin[:, :, ib : ib + 1])
        return float((qa * kb).sum())

    reference = score(4, 4, (0, 1), (2, 3))
    assert score(8, 12, (5, 7), (7, 9)) == pytest.approx(reference, rel=1e-5)
    assert score(8, 12, (5, 7), (7, 10)) != pytest.approx(reference, rel=1e-3)  # another offset


@pytest.mark.parametrize("name", ["dit-tiny", "dit-text-tiny", "mmdit-tiny"])
def test_one_model_runs_every_resolution_and_aspect_and_reads_its_condition(name):
    torch.manual_seed(0)
    text = "text" in name or name.startswith("mmdit")
    net = _awake(MODELS[name](16, 3, 24 if text else 3)).eval()
    t = torch.tensor([100.0, 900.0])
    conds = (
        [dict(encoder_hidden_states=torch.randn(2, 6, 24)) for _ in range(2)]
        if text
        else [dict(class_labels=torch.tensor([0, 1])), dict(class_labels=torch.tensor([2, 3]))]
    )
    with torch.no_grad():
        for h, w in ((16, 16), (32, 32), (16, 40)):
            x = torch.randn(2, 3, h, w)
            out = net(x, t, **conds[0]).sample
            assert out.shape == x.shape and torch.isfinite(out).all()
            assert not torch.allclose(out, net(x, t, **conds[1]).sample)  # the condition matters
        with pytest.raises(ValueError, match="grid of 2x2 patches"):
            net(torch.randn(2, 3, 15, 16), t, **conds[0])


def test_a_fresh_dit_predicts_zero_as_adaln_zero_promises():
    net = MODELS["dit-text-tiny"](16, 3, 8)
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]), encoder_hidden_states=torch.randn(2, 4, 8)).sample
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", ["dit-tiny", "mmdit-tiny"])
def test_routing_changes_training_only(name):
    torch.manual_seed(0)
    text = name.startswith("mmdit")
    net = _awake(MODELS[name](16, 3, 8 if text else 3))
    cond = dict(encoder_hidden_states=torch.randn(2, 4, 8)) if text else dict(class_labels=torch.tensor([0, 2]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300.0, 700.0])
    net.eval()
    with torch.no_grad():
        plain = net(x, t, **cond).sample
        net.set_routing(0.5, 0, 1)
        assert torch.equal(net(x, t, **cond).sample, plain)  # eval: every token, every block
        net.train()
        torch.manual_seed(1)
        routed = net(x, t, **cond).sample
        torch.manual_seed(1)
        assert torch.equal(net(x, t, **cond).sample, routed)  # the draw is torch's RNG: reproducible
        assert not torch.allclose(routed, plain, atol=1e-4)
        net.set_routing(None)
        assert torch.allclose(net(x, t, **cond).sample, plain, atol=1e-6)


def test_routed_tokens_skip_the_span_and_rejoin_as_they_left():
    torch.manual_seed(0)
    net = _awake(SfumatoDiT(hidden_size=32, depth=4, num_heads=2, num_class_embeds=3)).train()
    net.set_routing(0.5, 1, 3)
    seen = {}

    def keep(name):
        def hook(module, args, output=None):
            seen[name] = (output[0] if output is not None else args[0]).clone()

        return hook

    net.blocks[0].register_forward_hook(keep("left"))  # after block 0: every token
    net.blocks[1].register_forward_pre_hook(keep("span"))  # into the span: the kept half
    net.blocks[3].register_forward_pre_hook(keep("rejoined"))  # after it: every token again
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 20.0]), class_labels=torch.tensor([0, 1]))
    assert seen["span"].shape[1] == 8 and seen["rejoined"].shape[1] == 16
    unchanged = (seen["left"] == seen["rejoined"]).all(dim=-1)  # (images, tokens)
    assert unchanged.sum(dim=1).tolist() == [8, 8]  # the routed half, exactly as it left


@pytest.mark.parametrize(
    "bad", [dict(ratio=0.0), dict(ratio=1.0), dict(ratio=0.5, start=2, end=1), dict(ratio=0.5, start=0, end=9)]
)
def test_impossible_routing_is_refused(bad):
    net = SfumatoDiT(hidden_size=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="routing needs"):
        net.set_routing(**bad)


def test_masking_predicts_the_kept_patches_only_and_says_which():
    torch.manual_seed(0)
    net = _awake(SfumatoDiT(hidden_size=32, depth=3, num_heads=2, num_class_embeds=3))
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 800.0]), torch.tensor([0, 1])
    net.eval()
    with torch.no_grad():
        plain = net(x, t, class_labels=labels).sample
        net.set_masking(0.75, mixer_blocks=1)
        assert torch.equal(net(x, t, class_labels=labels).sample, plain) and net.loss_mask is None
        net.train()
        net.token_generator = torch.Generator().manual_seed(3)
        masked = net(x, t, class_labels=labels).sample
        mask = net.loss_mask
    assert mask.shape == (2, 1, 16, 16)
    assert mask.mean(dim=(1, 2, 3)).tolist() == [0.25, 0.25]  # 16 of 64 patches per image
    assert torch.equal(masked * (1 - mask), torch.zeros_like(masked))  # nothing drawn where dropped
    assert (masked.abs() * mask).sum() > 0
    # Patches are whole: the mask is constant on each 2x2 patch.
    assert torch.equal(mask, mask[..., ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
    with torch.no_grad():  # the draw is the generator's: a resumed run, whose generator is restored, redraws it
        net.token_generator = torch.Generator().manual_seed(3)
        assert torch.equal(net(x, t, class_labels=labels).sample, masked)


def test_the_loss_of_a_masked_step_counts_the_predicted_pixels_only():
    from sfumato.diffusion.loss import squared_error

    prediction, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[:, :, :2] = 5.0  # the dropped half is far off; it must not count
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 2:] = 1
    assert squared_error(prediction, target, mask).tolist() == [1.0, 1.0]
    assert squared_error(prediction, target, None).tolist() == [13.0, 13.0]


def test_a_masked_dit_trains_on_photos_and_unmasks_for_the_last_share(flowers_dir):
    import numpy as np
    from PIL import Image

    from sfumato.config import load_config
    from sfumato.data.decode import render
    from sfumato.models.run import training_levers
    from sfumato.train.step import train_step

    cfg = load_config(
        REPO / "configs" / "pilot.yaml",
        ["train.model=dit-tiny", "train.masking={ratio: 0.5, mixer_blocks: 0, unmasked_fraction: 0.25}"],
        inputs=False,
    )
    torch.manual_seed(0)
    model = build_denoiser("dit-tiny", 16, 3, num_classes=2)
    state = plain_state(model, null_class=2)
    photos = sorted(flowers_dir.glob("*/*.jpg"))[:4]
    images = np.stack([np.asarray(render(Image.open(p).convert("RGB"), 16, "center_crop")) for p in photos])
    batch = {"image": images, "class": np.array([0, 1, 0, 1]), "caption": [""] * 4, "id": list("abcd")}
    masked_steps = 0
    for step in range(8):
        training_levers(model, cfg.train, step / 8)
        out = train_step(state, batch)
        masked_steps += model.net.loss_mask is not None
        assert np.isfinite(float(out["loss"]))
    assert masked_steps == 6  # the last quarter ran unmasked


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.masking={ratio: 0.5}"], r"train\.masking works on a DiT's tokens; model 'unet-tiny' is a UNet"),
        (
            ["train.model=dit-s", "train.routing={ratio: 0.5, start_block: 1}", "train.masking={mixer_blocks: 2}"],
            r"train\.masking\.mixer_blocks 2 falls after train\.routing\.start_block 1",
        ),
        (["train.model=dit-s", "train.masking={ratio: 1.0}"], r"train\.masking\.ratio"),
    ],
)
def test_levers_that_cannot_work_fail_at_load_naming_the_key(overrides, message):
    from sfumato.config import load_config
    from sfumato.config.base import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "pilot.yaml", ["train.model=unet-tiny", *overrides], inputs=False)


@pytest.mark.parametrize("lever", ["routing", "masking"])
def test_the_levers_draw_from_the_trainings_generator_so_a_resumed_run_redraws_them(lever, flowers_dir):
    """A resumed run restores the training's generator, not torch's global RNG: the tokens a
    lever drops must come from the former, or a resumed run would train on other tokens."""
    import numpy as np
    from PIL import Image

    from sfumato.data.decode import render
    from sfumato.train.step import train_step

    photos = sorted(flowers_dir.glob("*/*.jpg"))[:2]
    images = np.stack([np.asarray(render(Image.open(p).convert("RGB"), 16, "center_crop")) for p in photos])
    batch = {"image": images, "class": np.array([0, 1]), "caption": ["", ""], "id": ["a", "b"]}

    def loss(global_seed: int) -> float:
        torch.manual_seed(0)
        model = build_denoiser("dit-tiny", 16, 3, num_classes=2)
        _awake(model.net)
        if lever == "routing":
            model.net.set_routing(0.5, 0, 1)
        else:
            model.net.set_masking(0.5, 0)
        state = plain_state(model, null_class=2)  # its generator: seed 0 every time
        torch.manual_seed(global_seed)  # what a resumed process's global RNG may be
        return float(train_step(state, batch)["loss"])

    assert loss(1) == loss(2)  # the global RNG plays no part
    assert np.isfinite(loss(1))

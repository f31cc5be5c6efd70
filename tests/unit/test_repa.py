"""REPA (sfumato.models.repa): a DiT's tokens aligned to a frozen image encoder's features of the
clean image. Tested with tiny randomly initialised DINOv2 encoders saved as a hub folder would be:
the code path, not a quality claim (no pretrained encoder can be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import REPO, plain_state, save_tiny_dinov2
from sfumato.models.registry import build_denoiser

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2-tiny"))


def _cfg(encoder, depth: int = 1, weight: float = 0.5):
    from sfumato.config.train import RepaConfig

    return RepaConfig(encoder=str(encoder), depth=depth, weight=weight, projector_dim=16)


def _batch(flowers_dir, count: int = 4, px: int = 16) -> dict:
    from PIL import Image

    from sfumato.data.decode import render

    photos = sorted(flowers_dir.glob("*/*.jpg"))[:count]
    images = np.stack([np.asarray(render(Image.open(p).convert("RGB"), px, "center_crop")) for p in photos])
    return {
        "image": images,
        "class": np.arange(count) % 2,
        "caption": [""] * count,
        "id": [str(i) for i in range(count)],
    }


def _awake(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def test_the_encoders_patch_grid_is_the_dits_token_grid_row_by_row(tmp_path, flowers_dir):
    """Feature i belongs to DiT token i: a change inside one token's pixels moves that token's
    feature (and, through the resize's few-pixel kernel, its neighbours'), no other. An encoder
    without attention layers keeps each patch's feature to its own pixels."""
    from sfumato.models.repa import RepaTarget

    target = RepaTarget(_cfg(save_tiny_dinov2(tmp_path / "enc", layers=0)))
    images = torch.from_numpy(_batch(flowers_dir, 1)["image"]).permute(0, 3, 1, 2).float() / 255
    rows = columns = 8  # 16 px in 2 px patches
    before = target.features(images, rows, columns)
    assert before.shape == (1, rows * columns, 32)
    changed = images.clone()
    changed[:, :, 6:8, 10:12] = 1 - changed[:, :, 6:8, 10:12]  # the pixels of token (3, 5)
    moved = (target.features(changed, rows, columns) - before).abs().amax(dim=-1)[0].reshape(rows, columns)
    assert moved[3, 5] > 1e-3
    far = moved.clone()
    far[2:5, 4:7] = 0  # token (3, 5) and its 8 neighbours
    assert far.max() < 1e-6, f"features moved away from the changed token: {far.nonzero().tolist()}"


def test_the_alignment_pulls_on_the_blocks_before_its_depth_and_the_projector_only(encoder_dir, flowers_dir):
    from sfumato.models.repa import attach
    from sfumato.train.step import image_loss

    batch = _batch(flowers_dir)

    def grads(with_repa: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_denoiser("dit-tiny", 16, 3, num_classes=2)  # 2 blocks
        _awake(model.net)
        target = attach(model, _cfg(encoder_dir, depth=1))
        model.net.set_repa(1)
        model.train()
        state = plain_state(model, null_class=2, repa=target if with_repa else None)
        loss, stats = image_loss(model, batch, state)
        assert ("repa_loss" in stats) == with_repa
        loss.backward()
        return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}

    plain, aligned = grads(False), grads(True)
    assert all(plain[n] is None for n in plain if n.startswith("repa."))
    assert all(aligned[n] is not None and aligned[n].abs().sum() > 0 for n in aligned if n.startswith("repa."))
    later = [n for n in plain if n.startswith(("net.blocks.1.", "net.proj_out", "net.ada_out"))]
    assert later and all(torch.equal(plain[n], aligned[n]) for n in later), "REPA reached past its depth"
    first = [n for n in plain if n.startswith("net.blocks.0.") and plain[n] is not None]
    assert any(not torch.allclose(plain[n], aligned[n]) for n in first), "REPA did not reach the first block"


def test_the_aligned_tokens_are_the_ones_masking_and_routing_keep():
    torch.manual_seed(0)
    net = _awake(build_denoiser("dit-tiny", 16, 3, num_classes=2).net).train()  # 2 blocks, 8 x 8 tokens
    x, t, labels = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])

    net.set_masking(0.5, 0)
    net.set_repa(2)
    net(x, t, class_labels=labels)
    tokens, positions, rows, columns = net.repa_tokens
    predicted = net.loss_mask[:, 0, ::2, ::2].reshape(3, -1)  # 1 where a token was kept
    assert (rows, columns) == (8, 8) and tokens.shape[:2] == positions.shape == (3, 32)
    for i in range(3):
        assert positions[i].tolist() == predicted[i].nonzero()[:, 0].tolist()

    net.set_masking(None)
    net.set_routing(0.5, 0, 1)
    net.set_repa(1)  # inside the routed span: the routed half
    net(x, t, class_labels=labels)
    inside = net.repa_tokens[1]
    assert inside.shape == (3, 32) and all(len(set(row.tolist())) == 32 for row in inside)
    net.set_repa(2)  # after the routed tokens rejoined: every token, in grid order
    net(x, t, class_labels=labels)
    assert torch.equal(net.repa_tokens[1], torch.arange(64).expand(3, -1))

    net.eval()
    net.repa_tokens = None
    with torch.no_grad():
        net(x, t, class_labels=labels)
    assert net.repa_tokens is None, "sampling kept tokens for REPA"


def test_a_dit_learns_to_align_and_its_weights_load_without_the_projector(encoder_dir, flowers_dir):
    """The alignment loss falls as the DiT and the projector train; the EMA copy that samples
    keeps the projector's names; what evaluation and export load (the run's weights without the
    projector) fills the plain architecture exactly."""
    from sfumato.models.registry import empty_like
    from sfumato.models.repa import attach, without_projector
    from sfumato.models.run import fill_parameters
    from sfumato.train.ema import EMA
    from sfumato.train.step import train_step

    torch.manual_seed(0)
    model = build_denoiser("dit-tiny", 16, 3, num_classes=2)
    target = attach(model, _cfg(encoder_dir, depth=1, weight=1.0))
    model.net.set_repa(1)
    state = plain_state(model, lr=3e-3, null_class=2, repa=target)
    batch = _batch(flowers_dir)
    curve = [float(train_step(state, batch)["repa_loss"]) for _ in range(30)]
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5]), f"the alignment did not improve: {curve}"

    ema = EMA(model, 0.9)
    weights = ema.state_dict(model)
    assert any(name.startswith("repa.") for name in weights)
    fill_parameters(empty_like(model), weights, "the EMA weights")  # the grids' copy
    fresh = build_denoiser("dit-tiny", 16, 3, num_classes=2)
    fill_parameters(fresh, without_projector(weights), "the checkpoint")  # evaluate, export, serve


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.model=unet-tiny", "train.repa={encoder: x}"], r"train\.repa works on a DiT's tokens"),
        (["train.model=dit-tiny", "train.repa={encoder: x, depth: 0}"], r"train\.repa\.depth"),
        (
            ["train.model=dit-tiny", "train.repa={encoder: x}", "train.vae={pretrained: stabilityai/sd-vae-ft-mse}"],
            r"train\.repa with train\.vae needs data\.cache\.enabled: false",
        ),
    ],
)
def test_repa_that_cannot_work_fails_at_load_naming_the_key(overrides, message):
    from sfumato.config import load_config
    from sfumato.config.base import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "pilot.yaml", overrides, inputs=False)


def test_an_encoder_that_is_not_there_or_not_a_vision_transformer_is_named(tmp_path):
    from transformers import BertConfig, BertModel

    from sfumato.models.repa import RepaTarget

    with pytest.raises(ValueError, match=r"train\.repa\.encoder='.*nowhere'"):
        RepaTarget(_cfg(tmp_path / "nowhere"))
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"REPA needs a vision transformer with one output token per patch"):
        RepaTarget(_cfg(tmp_path / "bert"))
    with pytest.raises(ValueError, match=r"REPA aligns the tokens after block 1\.\.2"):
        build_denoiser("dit-tiny", 16, 3, num_classes=2).net.set_repa(3)

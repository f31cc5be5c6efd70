"""Aspect-ratio buckets (data.shards.buckets): each resolution's buckets hold about its pixel
count at sizes the model takes; a photo goes to the bucket nearest its aspect; the UNets and the
DiT train and sample on every bucket (the DiT through `dit_forward`, which matches diffusers'
own forward where that one works); the server offers exactly the trained buckets."""

import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import REPO, plain_state  # noqa: E402
from sfumato.config import BucketsConfig, ConfigError, load_config  # noqa: E402
from sfumato.data.decode import nearest_bucket, render  # noqa: E402
from sfumato.models.names import SIZE_DIVISOR_PX  # noqa: E402
from sfumato.models.registry import build_denoiser  # noqa: E402

DEBUG = REPO / "configs" / "debug.yaml"
BUCKETS = "data.shards.buckets={aspect_ratios: [0.5, 0.75, 1.0, 1.333, 2.0], multiple_px: 8}"


def test_buckets_hold_about_the_resolutions_pixels_at_sizes_the_model_takes():
    cfg = load_config(DEBUG, [BUCKETS])
    for res in (16, 32):
        sizes = cfg.data.shards.bucket_sizes(res)
        assert (res, res) in sizes and all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
        assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    assert cfg.data.shards.bucket_sizes(32) == [(24, 48), (24, 40), (32, 32), (40, 24), (48, 24)]
    assert all(abs(w * h - 32 * 32) <= 0.15 * 32 * 32 for w, h in cfg.data.shards.bucket_sizes(32))
    assert cfg.trained_sizes_px == sorted(set(cfg.data.shards.bucket_sizes(16) + cfg.data.shards.bucket_sizes(32)))
    assert load_config(DEBUG).trained_sizes_px is None
    # Training grids: square at each stage's resolution, or at the bucket of an asked aspect ratio.
    assert load_config(DEBUG, [BUCKETS]).sample_size_px(32) == (32, 32)
    wide = load_config(DEBUG, [BUCKETS, "train.sample.aspect_ratio=2.0"])
    assert wide.sample_size_px(32) == (48, 24) and wide.sample_size_px(16) == (24, 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.shards.buckets={aspect_ratios: [0.5, 2.0]}"],
            r"data\.shards\.buckets\.aspect_ratios: .*must include 1\.0",
        ),
        (["data.shards.buckets={aspect_ratios: [1.0, 9.0]}"], r"data\.shards\.buckets\.aspect_ratios: .*0\.25\.\.4"),
        (
            ["data.shards.buckets={multiple_px: 12}"],
            r"data\.shards: resolutions_px \[16, 32\] are not multiples of buckets",
        ),
        (
            ["data.shards.buckets={multiple_px: 8}", "data.shards.resize_mode=shorter_side"],
            r"shorter_side and buckets exclude",
        ),
        (
            [
                "data.shards.buckets={multiple_px: 2}",
                "train.model=unet-xs",
                "train.stages=[{resolution_px: 16, steps: 2, micro_batch_size: 2}]",
            ],
            r"data\.shards\.buckets\.multiple_px=2 is not a multiple of 4, which model unet-xs needs",
        ),
        ([BUCKETS, "train.vae={pretrained: some/vae}"], r"buckets with train\.vae needs data\.cache\.enabled: false"),
        (
            ["train.sample.aspect_ratio=2.0"],
            r"train\.sample\.aspect_ratio=2\.0 is not a trained bucket's: set data\.shards\.buckets",
        ),
        ([BUCKETS, "train.sample.aspect_ratio=1.5"], r"aspect_ratio=1\.5 is not a trained bucket's: one of \[0\.5"),
    ],
)
def test_bucket_settings_that_cannot_work_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, overrides)


def test_a_photo_goes_to_the_bucket_nearest_its_aspect_and_fills_it(flowers_dir):
    sizes = BucketsConfig(aspect_ratios=[0.5, 0.75, 1.0, 4 / 3, 2.0]).sizes(32)
    assert sizes == [(24, 48), (24, 40), (32, 32), (40, 24), (48, 24)]
    assert nearest_bucket(500, 333, sizes) == (40, 24)  # 1.50: nearer 1.67 than 1.33 on a log scale
    assert nearest_bucket(333, 500, sizes) == (24, 40) and nearest_bucket(320, 310, sizes) == (32, 32)
    assert nearest_bucket(1000, 200, sizes) == (48, 24), "beyond the widest: the widest"

    def cut(photo, size) -> float:  # the share of the photo's long side a crop to `size` cuts off
        ratio = (photo.width / photo.height) / (size[0] / size[1])
        return 1 - min(ratio, 1 / ratio)

    cropped, square = [], []
    for path in sorted(flowers_dir.glob("*/*.jpg")):
        photo = Image.open(path).convert("RGB")
        bucket = nearest_bucket(*photo.size, BucketsConfig().sizes(256))
        assert render(photo, 256, "center_crop", bucket).size == bucket
        cropped.append(cut(photo, bucket))
        square.append(cut(photo, (1, 1)))
    # A square crop cuts a third of a 3:2 photo; its bucket a few per cent (at most ~11%).
    assert max(cropped) < 0.12 and sum(cropped) / len(cropped) < 0.04, (max(cropped), sum(cropped) / len(cropped))
    assert sum(square) / len(square) > 0.2


def test_every_models_size_divisor_is_what_its_network_needs():
    for name in ("unet-tiny", "unet-xs", "unet-text-tiny", "dit-tiny"):
        net = build_denoiser(
            name, 32, 3, None if "text" in name else 3, text_encoder=_tiny_text_encoder() if "text" in name else None
        ).net
        needed = net.config.patch_size if "dit" in name else 2 ** (len(net.config.block_out_channels) - 1)
        assert SIZE_DIVISOR_PX[name] == needed, name


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=16,
        )
    )


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
def test_a_model_trains_on_batches_of_different_buckets(name, flowers_dir):
    import numpy as np

    from sfumato.train.step import train_step

    torch.manual_seed(0)
    model = build_denoiser(name, 32, 3, num_classes=5)
    state = plain_state(model, null_class=5)
    photos = sorted(flowers_dir.glob("*/*.jpg"))
    for bucket in BucketsConfig().sizes(32):  # (24, 48) ... (48, 24): one micro-batch each
        images = np.stack(
            [np.asarray(render(Image.open(p).convert("RGB"), 32, "center_crop", bucket)) for p in photos[:2]]
        )
        out = train_step(state, {"image": images, "class": np.array([0, 1]), "caption": ["", ""], "id": ["a", "b"]})
        assert np.isfinite(float(out["loss"]))
    assert state.step == 5


def test_a_latent_model_trains_on_a_wide_bucket_through_the_vae(tmp_path, flowers_dir):
    import numpy as np

    from helpers import save_tiny_vae
    from sfumato.config import VAEConfig
    from sfumato.models.vae import LatentCodec
    from sfumato.train.step import train_step

    save_tiny_vae(tmp_path)
    codec = LatentCodec.load(VAEConfig(pretrained=str(tmp_path), subfolder="vae"))
    state = plain_state(build_denoiser("unet-tiny", 16, codec.channels), codec=codec)
    photos = sorted(flowers_dir.glob("*/*.jpg"))[:2]
    images = np.stack([np.asarray(render(Image.open(p).convert("RGB"), 32, "center_crop", (48, 24))) for p in photos])
    out = train_step(state, {"image": images, "class": np.array([-1, -1]), "caption": ["", ""], "id": ["a", "b"]})
    assert np.isfinite(float(out["loss"])) and state.step == 1


def test_sampling_and_the_served_request_take_any_trained_bucket():
    from pydantic import ValidationError

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.pipeline import SfumatoPipeline
    from sfumato.diffusion.sample import make_sampler, sample
    from sfumato.serve.app import ServeSettings, request_model
    from sfumato.serve.backends import ModelInfo

    torch.manual_seed(0)
    dit = build_denoiser("dit-tiny", 32, 3, num_classes=2).net.eval()
    pipe = SfumatoPipeline(unet=dit, scheduler=make_sampler(DiffusionConfig(), "ddim"), class_names=["a", "b"])
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe, 2, seed=0, steps=2, conditions=[0, 1], height=24, width=40)
    assert images.shape == (2, 3, 24, 40)
    trained = tuple(BucketsConfig().sizes(32))
    Request = request_model(
        ModelInfo("m", "torch", "class", ["a", "b"], ["ddim"], 32, 4, trained), ServeSettings(model="x")
    )
    assert (Request().width, Request().height) == (32, 32)
    assert (Request(width=48, height=24).width, Request(width=24, height=40).height) == (48, 40)
    for width, height in ((40, 40), (48, 48), (24, 24)):
        with pytest.raises(ValidationError, match="not a size this model was trained at: 24x40, 24x48, 32x32"):
            Request(width=width, height=height)
    with pytest.raises(ValidationError, match="width"):
        Request(width=64, height=32)

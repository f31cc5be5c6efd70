"""`sfumato bench cache`'s parts: Stable Diffusion's VAE as the bench builds it, the bytes it
calls the latents' against a real cache file, the FLOPs comparison. A bench's own test."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sfumato.bench import cache as bench  # noqa: E402


def test_the_vae_has_stable_diffusions_size_and_latent_shape():
    """83,653,863 parameters, as the pretrained SD VAE (CompVis/stable-diffusion-v1-4's vae/), and
    a 4 x 32 x 32 posterior for a 256 px image."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**bench.SD_VAE_CONFIG)
        posterior = vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert tuple(posterior.mean.shape) == (1, 4, 32, 32)
    assert bench.latent_bytes(256) == 2 * 4 * 32 * 32 * 2  # mean and std in float16


def test_the_encoders_flops_grow_with_the_pixels_and_a_little_faster():
    """Convolutions scale with the pixels; the middle block's attention over the latent's cells
    grows with their square."""
    small, large = bench.encoder_flops(64), bench.encoder_flops(256)
    assert 16 * small < large < 17 * small


def test_the_latent_bytes_are_what_a_cache_file_stores_but_its_header(tmp_path, cifar_dir):
    from helpers import cache_row, caption_shard, save_tiny_vae
    from sfumato.config import VAEConfig
    from sfumato.layout import CacheFolder, read_json
    from sfumato.models.cache import CacheEncoder

    shard = tmp_path / "shard-000000.tar"
    caption_shard(shard, cifar_dir)
    vae = save_tiny_vae(tmp_path / "sd")
    folder = CacheFolder(tmp_path / "cache")
    vae_cfg = VAEConfig(pretrained=str(tmp_path / "sd"), subfolder="vae")
    CacheEncoder(vae_cfg, None, "float16", 4, str(folder.root))(cache_row(shard, dtype="float16"))
    sidecar = read_json(CacheFolder.sidecar(folder.shard(16, 0)))
    tensors = sidecar["samples"] * bench.latent_bytes(16, dict(vae.config), dtype_bytes=2)
    assert tensors < sidecar["bytes"] < tensors + 4096


def test_the_vae_in_the_step_costs_small_models_most():
    rows = bench.flops_table(presets=("dit-xs", "dit-s"))
    assert [r["model"] for r in rows] == ["dit-xs", "dit-s"]
    for row in rows:
        assert row["with_vae"] == pytest.approx((row["training_flops"] + row["encoder_flops"]) / row["training_flops"])
    assert rows[0]["with_vae"] > rows[1]["with_vae"] > 1

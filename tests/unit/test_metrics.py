"""Evaluation metrics on real CIFAR-10 and flower photos: a Fréchet distance is zero from a set
to itself and grows with the noise added to it (under a tiny random CLIP and the random-init FID
Inception, since no pretrained weights can be downloaded), matches the closed form on Gaussians
computed by hand, reference statistics are cached by content, Inception weights load strictly
under pytorch-fid's key names, and CLIPScore is a bounded, order-free per-pair score that agrees
with CLIP's own processor and feature functions."""

import csv
import hashlib
import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sfumato.data.shards import tar_add  # noqa: E402
from sfumato.evaluate.clipscore import clip_score, clip_scores  # noqa: E402
from sfumato.evaluate.features import Clip, ClipFeatures, InceptionFeatures, load_extractor  # noqa: E402
from sfumato.evaluate.fid import Statistics, frechet_distance, reference_statistics, statistics  # noqa: E402
from sfumato.evaluate.inception import WEIGHTS_FILE, FIDInceptionV3, load_fid_inception  # noqa: E402
from sfumato.layout import ShardFolder  # noqa: E402
from sfumato.testing.tiny import save_tiny_clip  # noqa: E402

NOISE_SIGMAS = (0.05, 0.2, 0.5)


def _as_tensor(paths) -> torch.Tensor:
    """RGB files -> float NCHW in [-1, 1], what the sampler hands to the metrics."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def _noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return (images + sigma * noise).clamp(-1, 1)


@pytest.fixture(scope="module")
def cifar_files(cifar_dir):
    return sorted(cifar_dir.rglob("*.jpg"))  # 80: 8 of each of the 10 classes


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def clip(clip_folder):
    return Clip(str(clip_folder))


def _zero_on_itself_and_growing_with_noise(extractor, images):
    # One call over [clean, clean again, noisier and noisier], split: a second, independent
    # extraction of the clean set must be at distance ~0, the noisy ones increasingly far.
    sets = [images, images, *(_noisy(images, s) for s in NOISE_SIGMAS)]
    features = np.split(extractor(torch.cat(sets)), len(sets))
    clean, again, *noisy = [statistics(f, extractor.name) for f in features]
    scale = np.trace(clean.sigma) + clean.mu @ clean.mu
    assert frechet_distance(clean, again) <= 1e-7 * scale
    distances = [frechet_distance(clean, n) for n in noisy]
    assert distances[0] > 1e-5 * scale, f"the mildest noise is not told from the set itself: {distances}"
    assert distances == sorted(distances) and len(set(distances)) == len(distances), f"not increasing: {distances}"


def test_fd_clip_is_zero_on_itself_and_grows_with_noise(clip, cifar_files):
    extractor = ClipFeatures(clip, batch_size=32)
    assert extractor.metric == "FD-CLIP" and extractor.name == f"clip:{clip.source}"
    features = extractor(_as_tensor(cifar_files))
    assert features.shape == (80, extractor.dim) and features.dtype == np.float64
    _zero_on_itself_and_growing_with_noise(extractor, _as_tensor(cifar_files))


def test_fid_inception_is_zero_on_itself_and_grows_with_noise(cifar_files):
    # 3 images at 299 px, 5 sets in one pass: 15 x 5.7 GFLOPs, ~0.1 s per image on 2 idle CPU
    # cores. The 2048-d covariance of 3 images has rank 2; the distance must still behave.
    torch.manual_seed(0)
    extractor = InceptionFeatures(FIDInceptionV3(), batch_size=16)
    assert extractor.metric == "FID" and extractor.dim == 2048
    _zero_on_itself_and_growing_with_noise(extractor, _as_tensor(cifar_files[::27]))


def test_frechet_distance_matches_the_closed_form_on_2d_gaussians():
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    a, b = Statistics(np.zeros(2), s1, 100, "f"), Statistics(np.array([1.0, 2.0]), s2, 100, "f")
    # For 2x2 matrices with nonnegative eigenvalues l1, l2: tr sqrt(M) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)), and det(S1 S2) = det S1 det S2 = 1.75 * 0.41.
    trace_sqrt = math.sqrt(2.2 + 2 * math.sqrt(1.75 * 0.41))  # tr(S1 S2) = 2 - 0.15 - 0.15 + 0.5
    expected = 5.0 + 3.0 + 1.5 - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-12), "symmetric"
    # Commuting (diagonal) covariances: sum of (sqrt a_i - sqrt b_i)^2, here with a singular S1.
    c, d = Statistics(np.ones(2), np.diag([4.0, 0.0]), 9, "f"), Statistics(np.ones(2), np.diag([1.0, 9.0]), 9, "f")
    assert frechet_distance(c, d) == pytest.approx((2 - 1) ** 2 + (0 - 3) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="not comparable.*'f'.*'g'"):
        frechet_distance(a, Statistics(b.mu, b.sigma, 100, "g"))


@pytest.mark.parametrize("images", [5, 200], ids=["rank-deficient", "full-rank"])
def test_frechet_distance_agrees_with_the_eigenvalues_of_s1_s2(images):
    rng = np.random.default_rng(1)
    a = statistics(rng.standard_normal((images, 16)) @ rng.standard_normal((16, 16)), "f")
    b = statistics(rng.standard_normal((300, 16)) + 0.5, "f")
    # Independently: tr sqrt(S1 S2) from the eigenvalues of the non-symmetric product itself.
    eigenvalues = np.linalg.eigvals(a.sigma @ b.sigma).real
    naive = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(eigenvalues.clip(0)).sum()
    assert frechet_distance(a, b) == pytest.approx(naive, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(naive, rel=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_statistics_round_trip_through_a_file(tmp_path, suffix):
    stats = statistics(np.random.default_rng(0).standard_normal((50, 6)), "clip:x")
    stats.save(tmp_path / f"ref{suffix}")
    loaded = Statistics.load(tmp_path / f"ref{suffix}")
    assert (loaded.count, loaded.features) == (50, "clip:x")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert [p.name for p in tmp_path.iterdir()] == [f"ref{suffix}"], "no temp file left"


class Counting:
    """An extractor that counts the images it was asked for."""

    def __init__(self, inner, name=None):
        self.inner, self.name, self.metric, self.dim = inner, name or inner.name, inner.metric, inner.dim
        self.images = 0

    def __call__(self, images):
        self.images += len(images)
        return self.inner(images)


def _write_shards(shards_dir, files, per_shard=40, resolution_px=32):
    """WebDataset tars as `sfumato shards` writes them (image, caption, json), plus the manifest."""
    (shards_dir / str(resolution_px)).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, start in enumerate(range(0, len(files), per_shard)):
        name = f"{resolution_px}/shard-{index:06d}.tar"
        with tarfile.open(shards_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, path in enumerate(files[start : start + per_shard], start):
                tar_add(tar, f"{key:09d}.jpg", path.read_bytes())
                tar_add(tar, f"{key:09d}.txt", f"a photo of a {path.parent.name}".encode())
                tar_add(tar, f"{key:09d}.json", json.dumps({"id": path.stem, "caption": ""}).encode())
        data = (shards_dir / name).read_bytes()
        rows.append(
            {
                "shard": name,
                "resolution_px": resolution_px,
                "sample_count": len(files[start : start + per_shard]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    with ShardFolder(shards_dir).manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_reference_statistics_are_the_shards_and_cached_by_content(tmp_path, clip, cifar_files):
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    _write_shards(shards, cifar_files)
    extractor = Counting(ClipFeatures(clip))
    first = reference_statistics(shards, 32, extractor, max_images=50, cache_dir=cache, batch_size=16)
    assert extractor.images == first.count == 50
    direct = statistics(extractor.inner(_as_tensor(cifar_files[:50])), extractor.name)
    assert np.allclose(first.mu, direct.mu, atol=1e-9) and np.allclose(first.sigma, direct.sigma, atol=1e-9)

    again = reference_statistics(shards, 32, extractor, max_images=50, cache_dir=cache, batch_size=16)
    assert extractor.images == 50, "the second call reads the cache"
    assert np.array_equal(again.sigma, first.sigma) and again.features == first.features

    everything = reference_statistics(shards, 32, extractor, max_images=None, cache_dir=cache)
    assert everything.count == 80 and extractor.images == 130 and len(list(cache.iterdir())) == 2
    renamed = Counting(extractor.inner, name="clip:another")
    assert reference_statistics(shards, 32, renamed, None, cache).features == "clip:another" and renamed.images == 80
    _write_shards(shards, cifar_files[::-1])  # new shard content: recomputed, not served stale
    reordered = reference_statistics(shards, 32, extractor, max_images=50, cache_dir=cache)
    assert extractor.images == 180 and not np.allclose(reordered.mu, first.mu)


def test_inception_has_pytorch_fids_keys_and_loads_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    model = FIDInceptionV3()
    # torchvision's inception_v3 without the aux head has 23,834,568 parameters at 1000 classes;
    # the TF graph's head has 1008: 8 more rows of 2048 weights + 1 bias.
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2049
    state = model.state_dict()
    assert {
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.running_mean",
        "Mixed_5b.branch1x1.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.bias",
        "Mixed_7c.branch3x3dbl_3b.conv.weight",
        "fc.weight",
    } <= set(state)
    assert not any(k.endswith(".conv.bias") for k in state), "BasicConv2d convolutions have no bias"
    (tmp_path / "folder").mkdir()
    save_file(state, str(tmp_path / "folder" / WEIGHTS_FILE))
    loaded = load_fid_inception(tmp_path / "folder")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    assert InceptionFeatures(str(tmp_path / "folder")).name == "inception-v3 (pt_inception-2015-12-05)"

    file = tmp_path / "broken.safetensors"
    saved = load_file(str(tmp_path / "folder" / WEIGHTS_FILE))
    counters = {k for k in saved if k.endswith("num_batches_tracked")}
    save_file({k: v for k, v in saved.items() if k not in counters}, str(file))
    load_fid_inception(file)  # the BatchNorm counters may be absent
    save_file({k: v for k, v in saved.items() if k != "Mixed_6b.branch7x7_2.conv.weight"}, str(file))
    with pytest.raises(
        ValueError, match=r"broken\.safetensors.*missing keys \['Mixed_6b\.branch7x7_2\.conv\.weight'\]"
    ):
        load_fid_inception(file)
    save_file({**saved, "AuxLogits.fc.weight": torch.zeros(2), "fc.bias": torch.zeros(1000)}, str(file))
    with pytest.raises(ValueError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\].*fc\.bias \(1000,\)"):
        load_fid_inception(file)


def test_load_extractor_names_the_config_keys(tmp_path, clip_folder):
    with pytest.raises(ValueError, match="evaluate.inception_weights.*evaluate.clip_model.*data.curate.clip.model"):
        load_extractor(None, None)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):  # never a silent CLIP fallback
        load_extractor(str(tmp_path / "nowhere.safetensors"), str(clip_folder))
    with pytest.raises(FileNotFoundError, match=f"holds no {WEIGHTS_FILE}"):
        load_extractor(str(tmp_path), None)
    assert load_extractor(None, str(clip_folder)).metric == "FD-CLIP"


def test_clip_preprocessing_matches_clips_own_processor(clip, clip_folder, flowers_dir):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(clip_folder)
    paths = sorted(flowers_dir.rglob("*.jpg"))[::12]  # 5 photos, 240-500 px, not square
    for path in paths:
        theirs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        ours = clip.pixel_values(_as_tensor([path]))
        assert ours.shape == theirs.shape
        # Both are bicubic with antialiasing; PIL rounds to 8 bits on the way: ~1/255 / std apart.
        assert (ours - theirs).abs().mean() < 0.03, path


def test_clipscore_is_bounded_order_free_and_matches_clip(clip, clip_folder, cifar_files):
    from transformers import CLIPImageProcessor, CLIPModel

    files = cifar_files[::4]  # 20 images, 2 of each class
    images = _as_tensor(files)
    captions = [f"a photo of a {p.parent.name}" for p in files]
    captions[0] = "a photo of a tulip " * 40  # past the 32 positions: truncated, not an error
    scores = clip_scores(images, captions, clip, batch_size=8)
    assert scores.shape == (20,) and ((scores >= 0) & (scores <= 100)).all()
    assert clip_score(images, captions, clip) == pytest.approx(scores.mean(), abs=1e-9)
    assert np.array_equal(clip_scores(images, captions, clip, batch_size=8), scores), "deterministic"
    order = np.random.default_rng(0).permutation(20)
    assert np.allclose(clip_scores(images[order], [captions[i] for i in order], clip), scores[order], atol=1e-9)

    # Independently: CLIP's own processor and feature functions (32 px images need no resize).
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPImageProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in files], return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = clip.tokenizer(captions, padding=True, truncation=True, max_length=32, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text).double().numpy()
    assert np.allclose(scores, 100 * np.clip(cosine, 0, None), atol=1e-3)

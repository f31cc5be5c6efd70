"""The serving output filter on real photos with a tiny CLIP: flagged images are withheld or blurred
by the threshold, the others pass untouched, and its scores are the curation scorer's."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from sfumato.config import SafetyConfig  # noqa: E402
from sfumato.serve.safety import BLURRED, PASSED, WITHHELD, OutputFilter  # noqa: E402

PROMPTS = dict(unsafe=SafetyConfig().unsafe_prompts, safe=SafetyConfig().safe_prompts)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from sfumato.testing.tiny import save_tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder)
    return str(folder)


@pytest.fixture(scope="module")
def photos(flowers_dir):
    files = sorted(flowers_dir.rglob("*.jpg"))[::6][:8]
    return [np.asarray(Image.open(f).convert("RGB").resize((48, 32))) for f in files]


def test_images_at_or_above_the_threshold_are_withheld_and_the_rest_pass_untouched(clip_dir, photos):
    scores = [v.score for _, v in OutputFilter(clip_dir, 1.0, "withhold", **PROMPTS)(photos)]
    assert len(set(scores)) == len(photos), "distinct photos, distinct scores"
    threshold = float(np.median(scores))
    checked = OutputFilter(clip_dir, threshold, "withhold", **PROMPTS)(photos)
    for photo, score, (image, verdict) in zip(photos, scores, checked):
        assert verdict.score == pytest.approx(score)
        if score >= threshold:
            assert verdict.action == WITHHELD and image is None
        else:
            assert verdict.action == PASSED and image is photo
    assert {v.action for _, v in checked} == {WITHHELD, PASSED}


def test_blur_returns_the_flagged_image_blurred_beyond_its_detail(clip_dir, photos):
    checked = OutputFilter(clip_dir, 0.0, "blur", **PROMPTS)(photos)  # every score is >= 0: all flagged
    for photo, (image, verdict) in zip(photos, checked):
        assert verdict.action == BLURRED and image.shape == photo.shape and image.dtype == np.uint8
        detail = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
        assert detail(image) < detail(photo) / 3, "the blur removes most of the high frequencies"


def test_the_filter_scores_as_the_curation_stage_does(clip_dir, photos):
    from sfumato.data.embed import ClipEmbedder
    from sfumato.data.safety import NsfwScorer

    clip = ClipEmbedder(clip_dir)
    curation = NsfwScorer(clip, **PROMPTS)(clip.embed_images(photos))
    serving = [v.score for _, v in OutputFilter(clip_dir, 1.0, "withhold", **PROMPTS)(photos)]
    np.testing.assert_allclose(serving, curation, rtol=1e-6)


def test_an_unknown_action_is_refused(clip_dir):
    with pytest.raises(ValueError, match="safety_action"):
        OutputFilter(clip_dir, 0.5, "delete", **PROMPTS)


def test_the_drift_statistics_rank_real_photos_as_a_person_would(photos):
    from sfumato.serve.metrics import image_stats

    grey = np.full((32, 32, 3), 128, np.uint8)
    assert image_stats(grey) == pytest.approx((128 / 255, 0.0))
    assert image_stats(np.zeros_like(grey))[0] == 0 and image_stats(np.full_like(grey, 255))[0] == pytest.approx(1.0)
    for photo in photos:
        brightness, colourfulness = image_stats(photo)
        desaturated = np.repeat(photo.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
        assert image_stats(desaturated)[1] < 1 < colourfulness, "a flower photo is more colourful than its grey copy"
        assert image_stats((photo // 2).astype(np.uint8))[0] == pytest.approx(brightness / 2, abs=0.01)

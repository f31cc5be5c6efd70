"""What decides that a pipeline stage is complete: its fingerprint (the config keys it reads, its
inputs, what its upstream stages wrote), and the refusal to continue a run folder of another run.
The whole job, on a real two-node cluster, is tests/smoke/test_cluster.py."""

import os
import shutil

import pytest

from helpers import REPO
from sfumato.config import ConfigError, load_config
from sfumato.pipeline import StageRecord, _check_run_folder, fingerprint
from sfumato.stages import REGISTRY as STAGES_BY_NAME

DEBUG = REPO / "configs" / "debug.yaml"
UPSTREAM = {
    "ingest": "a" * 16,
    "safety": "b" * 16,
    "dedup": "c" * 16,
    "caption": "d" * 16,
    "shards": "e" * 16,
    "tune": "f" * 16,
    "train": "0" * 16,
}


def _fp(stage: str, *overrides: str, outputs: dict | None = None) -> str:
    cfg = load_config(DEBUG, list(overrides))
    return fingerprint(STAGES_BY_NAME[stage], cfg, outputs or UPSTREAM)


@pytest.mark.parametrize(
    "stage, reads, ignores",
    [
        ("export", "export.int8=false", "evaluate.num_samples=64"),
        ("evaluate", "evaluate.num_samples=64", "export.int8=false"),
        ("train", "train.optimizer.lr=0.01", "evaluate.num_samples=64"),
        ("shards", "data.shards.samples_per_shard=8", "train.optimizer.lr=0.01"),
        ("ingest", "data.ingest.min_side_px=20", "data.shards.samples_per_shard=8"),
    ],
)
def test_a_stage_reruns_for_the_keys_it_reads_only(stage, reads, ignores):
    assert _fp(stage, reads) != _fp(stage)
    assert _fp(stage, ignores) == _fp(stage)


def test_a_stage_reruns_when_what_it_reads_changed():
    assert _fp("train", outputs={**UPSTREAM, "shards": "9" * 16}) != _fp("train")
    assert _fp("export", outputs={**UPSTREAM, "train": "9" * 16}) != _fp("export")
    # Export reads the trained weights, not the shards: re-sharded bytes alone do not re-export.
    assert _fp("export", outputs={**UPSTREAM, "shards": "9" * 16}) == _fp("export")


def test_the_data_stages_read_the_manifest_the_last_enabled_one_wrote():
    # Without a CLIP model safety and dedup are off: shards reads what ingest wrote.
    cfg = load_config(DEBUG)
    assert STAGES_BY_NAME["shards"].reads(cfg) == ["ingest"]
    curated = load_config(DEBUG, ["data.curate.clip.model=some/clip", "data.curate.caption.trigger=sks"])
    assert STAGES_BY_NAME["shards"].reads(curated) == ["caption"]
    assert STAGES_BY_NAME["dedup"].reads(curated) == ["safety"]


def test_ingest_sees_a_changed_source_file(tmp_path, cifar_dir):
    images = shutil.copytree(cifar_dir, tmp_path / "cifar")  # the test changes a file: not the fixture's
    source = f"data.sources=[{{kind: folder, name: c, path: {images}, license: CC0-1.0}}]"
    before = _fp("ingest", source)
    assert _fp("ingest", source) == before
    image = next(images.rglob("*.jpg"))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _fp("ingest", source) != before


def test_a_run_folder_of_another_run_is_refused_not_continued(tmp_path):
    cfg = load_config(DEBUG, [f"train.output_dir={tmp_path / 'run'}"])
    _check_run_folder(cfg, None)  # nothing trained there yet: start
    step = tmp_path / "run" / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)
    (step / "COMMITTED").write_text("5")
    with pytest.raises(ConfigError, match="did not start"):
        _check_run_folder(cfg, None)
    with pytest.raises(ConfigError, match="another config or other data"):
        _check_run_folder(cfg, StageRecord("train", "done", "0" * 16))


def test_two_colour_share_tells_demo_images_from_noise():
    import numpy as np

    from sfumato.data.demo import draw_sample, two_colour_share

    rng = np.random.default_rng(0)
    demo = np.stack([np.asarray(draw_sample(rng, 32)[0]) for _ in range(32)])
    assert two_colour_share(demo) > 0.9
    assert two_colour_share(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)) < 0.2
    # Colours off the palette (a washed-out grey-brown model output) do not count.
    assert two_colour_share(np.full((4, 32, 32, 3), 128, dtype=np.uint8)) == 0.0

"""Aspect-ratio buckets end to end on local Ray: real flower photos of varied shapes are sharded
into buckets, two workers train on single-bucket micro-batches, and a run whose worker is killed
mid-epoch ends with the same weights as an uninterrupted one (the bucket position resumes)."""

import json
import tarfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from helpers import debug_config  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.layout import DataFolder  # noqa: E402
from sfumato.train.faults import KillWorkerAt  # noqa: E402
from sfumato.train.loop import run_training  # noqa: E402

pytestmark = pytest.mark.slow

BUCKETS = "data.shards.buckets={aspect_ratios: [0.5, 0.75, 1.0, 1.333, 2.0], multiple_px: 8}"


def _cfg(tmp, flowers_dir, run: str):
    sources = [{"kind": "folder", "name": "flowers", "path": str(flowers_dir), "license": "CC-BY-2.0"}]
    return debug_config(
        tmp,
        sources,
        BUCKETS,
        f"train.output_dir={tmp / run}",
        "data.shards.samples_per_shard=30",
        "train.sample.aspect_ratio=2.0",
    )


@pytest.fixture(scope="module")
def flower_buckets(tmp_path_factory, flowers_dir, ray_local):
    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards

    tmp = tmp_path_factory.mktemp("buckets")
    cfg = _cfg(tmp, flowers_dir, "unused")
    run_ingest(cfg)
    run_shards(cfg)
    return tmp


def test_shards_store_each_photo_at_its_bucket(flower_buckets, flowers_dir):
    cfg = _cfg(flower_buckets, flowers_dir, "unused")
    shards = DataFolder(cfg.data.output_dir).shard_folder
    for res in (16, 32):
        buckets = set()
        for tar_path in sorted(shards.resolution(res).glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        buckets.add(tuple(json.loads(tar.extractfile(member).read())["bucket_px"]))
        assert buckets <= set(cfg.data.shards.bucket_sizes(res)) and len(buckets) >= 2, buckets


def test_a_killed_bucketed_run_resumes_to_the_same_weights(flower_buckets, flowers_dir):
    straight = _cfg(flower_buckets, flowers_dir, "straight")
    run_training(straight)
    killed = _cfg(flower_buckets, flowers_dir, "killed")
    run_training(killed, hooks=[KillWorkerAt(7)])  # after the step-5 checkpoint, taken mid-epoch
    assert (killed.train.output_dir / ".injected").read_text() == "7", "the failure really happened"
    a = ckpt.latest(straight.train.output_dir / "checkpoints")
    b = ckpt.latest(killed.train.output_dir / "checkpoints")
    assert a.name == b.name == "step-00000010"
    resumed_from = ckpt.committed(killed.train.output_dir / "checkpoints")[0]
    assert resumed_from.name == "step-00000005"
    position = ckpt.load_loader_position(resumed_from, 1)
    assert position["stage"] == 0 and position["samples"] > 0, "the bucket position counts the epoch's samples read"
    ema_a, ema_b = ckpt.load_ema(a), ckpt.load_ema(b)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "EMA weights differ after resume"
    model_a = torch.load(a / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model_b = torch.load(b / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "weights differ after resume"
    from PIL import Image

    # The grid asked for the 2:1 bucket: 4 images of 48x24 at 32 px, two by two.
    assert Image.open(straight.train.output_dir / "samples" / "step-00000010.png").size == (96, 48)


def test_the_export_serves_exactly_the_trained_buckets(flower_buckets, flowers_dir):
    from sfumato.export.export_run import run_export
    from sfumato.serve.app import ServeSettings, request_model
    from sfumato.serve.backends import Job, TorchBackend

    straight = _cfg(flower_buckets, flowers_dir, "straight")
    if ckpt.latest(straight.train.output_dir / "checkpoints") is None:
        run_training(straight)
    export = flower_buckets / "export"
    run_export(straight.train.output_dir, overrides=["export.onnx=false"], out_dir=export)
    backend = TorchBackend(export)
    info = backend.info()
    assert set(info.trained_sizes_px) == set(straight.trained_sizes_px) and (48, 24) in info.trained_sizes_px
    Request = request_model(info, ServeSettings(model=str(export)))
    Request(width=48, height=24)
    with pytest.raises(ValueError, match="not a size this model was trained at"):
        Request(width=40, height=40)
    # The exported pipeline (its own copy of the sampling code) generates the wide bucket.
    (images,) = backend.generate(
        [Job("a", seed=0, steps=2, guidance_scale=1.0, num_images=1, sampler="ddim", width=48, height=24)]
    )
    assert images[0].shape == (24, 48, 3)

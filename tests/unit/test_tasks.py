"""One worker loop runs every training task (issue 33): pre-training, a fine-tune and Diffusion-DPO
go through the same `optimizer_step` and `log_records` of sfumato.train.worker, told apart only
by the task object, on real CIFAR-10 images; no Ray, no DeepSpeed (PlainEngine)."""

import inspect
import io
import json
import math
import tarfile

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import REPO, plain_state  # noqa: E402
from sfumato.records import (
    AlignmentStepRecord,
    AlignmentValidationRecord,
    MetricsLine,
    TrainStepRecord,  # noqa: E402
    ValidationRecord,
)


@pytest.fixture(scope="module")
def data(cifar_dir, tmp_path_factory):
    """Two 16 px shards of 32 real CIFAR-10 images each, and 24 preference pairs of those images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from sfumato.data.shards import tar_add
    from sfumato.layout import DataFolder

    root = tmp_path_factory.mktemp("tasks")
    images, classes = sorted(cifar_dir.glob("*/*.jpg"))[:64], _classes(cifar_dir)
    shards = DataFolder(root / "data").shard_folder
    shards.resolution(16).mkdir(parents=True)
    for index in range(2):
        with tarfile.open(shards.shard(16, index), "w") as tar:
            for key in range(index * 32, index * 32 + 32):
                png = io.BytesIO()
                Image.open(images[key]).convert("RGB").resize((16, 16)).save(png, "png")
                tar_add(tar, f"{key:09d}.png", png.getvalue())
                tar_add(tar, f"{key:09d}.json", json.dumps({"id": f"c{key}", "caption": ""}).encode())
                tar_add(tar, f"{key:09d}.cls", str(classes.index(images[key].parent.name)).encode())
    shards.manifest.write_text(
        "shard,resolution_px\n" + "".join(f"{shards.shard(16, i).relative_to(shards.root)},16\n" for i in range(2))
    )
    pairs = [(images[i].parent.name, images[i].read_bytes(), images[63 - i].read_bytes()) for i in range(24)]
    pq.write_table(
        pa.table(
            {
                "id": [f"p{i}" for i in range(24)],
                "condition": [c for c, _, _ in pairs],
                "chosen": [c for _, c, _ in pairs],
                "rejected": [r for _, _, r in pairs],
            }
        ),
        root / "pairs.parquet",
    )
    return root


def _classes(cifar_dir) -> list[str]:
    return sorted(p.name for p in cifar_dir.iterdir() if p.is_dir())


def _config(root, kind: str):
    from sfumato.config import load_config

    overrides = [
        f"data.output_dir={root / 'data'}",
        f"train.output_dir={root / kind}",
        "train.stages=[{resolution_px: 16, steps: 2, micro_batch_size: 4}]",
        "train.validation={holdout_fraction: 0.25, max_samples: 8, every_steps: 2, num_timesteps: 2}",
    ]
    if kind != "pretraining":
        overrides.append("train.lineage={pretrained: a-start}")
    if kind == "alignment":
        overrides.append(f"train.dpo={{pairs: {root / 'pairs.parquet'}, beta: 2000.0, holdout_fraction: 0.25}}")
    return load_config(REPO / "configs" / "debug.yaml", overrides)


def _worker(cfg, model, task):
    from sfumato.layout import RunFolder
    from sfumato.train.ema import EMA
    from sfumato.train.progress import LossAverage, Progress
    from sfumato.train.worker import Worker

    state = plain_state(model, lr=1e-3, null_class=model.null_class)
    progress = Progress(cfg.train, 0)
    progress.start_stage(cfg.train.stages[0])
    return Worker(
        cfg,
        RunFolder(cfg.train.output_dir),
        0,
        1,
        torch.device("cpu"),
        state.engine,
        EMA(model, 0.9),
        state,
        None,
        task,
        None,
        loss_average=LossAverage(),
        progress=progress,
    )


@pytest.mark.parametrize("kind", ["pretraining", "finetuning", "alignment"])
def test_every_task_runs_through_the_same_loop_and_logs_through_the_same_records(data, cifar_dir, kind):
    from types import SimpleNamespace

    from sfumato.models.registry import build_denoiser
    from sfumato.train.tasks import make_task
    from sfumato.train.worker import log_records, optimizer_step

    cfg = _config(data, kind)
    selection = {f"c{key}" for key in range(0, 64, 3)}  # a fine-tune's: every third image
    if kind == "finetuning":
        (data / kind).mkdir(exist_ok=True)
        (data / kind / "selected_ids.txt").write_text("\n".join(sorted(selection)) + "\n")
    torch.manual_seed(0)
    classes = _classes(cifar_dir)
    model = build_denoiser("unet-tiny", 16, 3, len(classes))
    task = make_task(cfg, SimpleNamespace(denoiser=model, class_names=classes))
    assert (
        type(task).__name__
        == {"pretraining": "PreTraining", "finetuning": "FineTuning", "alignment": "Alignment"}[kind]
    )
    worker = _worker(cfg, model, task)

    batches = task.batches(0, 0, 1, None)
    outs = [optimizer_step(worker, 0, batches) for _ in range(2)]
    assert worker.state.step == 2 and worker.position["stage"] == 0
    records = log_records(worker, 0, outs[-1])
    assert isinstance(records[0], TrainStepRecord) and math.isfinite(records[0].loss)
    line = MetricsLine(worker.state.step, 0.0, 1, records + task.validate(model, 0, worker.state))
    assert MetricsLine.from_json(json.loads(json.dumps(line.to_json()))) == line, "the line reads back as written"

    if kind == "alignment":
        # The policy starts as the reference: its first DPO loss is log 2 (Wallace et al. 2023).
        assert float(outs[0]["loss"]) == pytest.approx(math.log(2), abs=1e-3)
        assert isinstance(line.get(AlignmentStepRecord), AlignmentStepRecord)
        held = line.get(AlignmentValidationRecord)
        assert held.policy_distance > 0 and 0 <= held.heldout_reward_accuracy <= 1
    else:
        assert math.isfinite(line.get(ValidationRecord).val_loss)
        ids = {i for batch, _ in (next(task.batches(0, 0, 1, None)) for _ in range(1)) for i in batch["id"]}
        assert kind != "finetuning" or ids <= selection, "a fine-tune reads only its selected samples"


def test_the_worker_loop_never_asks_which_task_it_runs():
    from sfumato.train import worker

    source = inspect.getsource(worker)
    for word in ("dpo", "lineage", "pairs", "Alignment", "FineTuning", "PreTraining", "selected_ids"):
        assert word not in source, f"sfumato.train.worker mentions {word!r}: a task's concern leaked into the loop"

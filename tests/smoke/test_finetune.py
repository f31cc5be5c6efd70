"""Post-training part 1 on local Ray + DeepSpeed ZeRO-2, real CIFAR-10 images: a LoRA fine-tune
of the `straight` debug run on a subset of its classes.

What a user relies on: only the adapters train (the base weights stay bitwise the parent's), the
adapter exported in diffusers' LoRA format loads with `load_lora_weights` in a process that
cannot import sfumato and draws what the merged export draws, a killed fine-tune resumes to the
uninterrupted one's weights, and a filter that selects nothing fails before any work. A DiT run
(dit-tiny) fine-tunes with LoRA and in full as a UNet run does."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")

from helpers import NO_SFUMATO, run_config  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402
from sfumato.config import load_run_config  # noqa: E402
from sfumato.layout import RunFolder, read_jsonl  # noqa: E402
from sfumato.train import finetune  # noqa: E402
from sfumato.train.faults import KillWorkerAt  # noqa: E402
from sfumato.train.loop import run_training  # noqa: E402

SUBSET = ["airplane", "automobile", "bird"]


def _finetune_cfg(cifar_shards, parent, name: str, *extra: str, lora: bool = True):
    """The parent's config with a finetune section: 3 of its 10 classes, 6 steps at 32 px."""
    cfg = run_config(
        cifar_shards,
        parent.train.output_dir.name,
        f"train.model={parent.train.model}",
        f"finetune.select.tags={json.dumps(SUBSET)}",
        f"finetune.overrides={{train.output_dir: {cifar_shards / name}, train.optimizer.lr: 0.01, "
        "train.optimizer.warmup_steps: 1, train.checkpoint_every_steps: 3, train.sample_every_steps: 6, "
        "train.stages: [{resolution_px: 32, steps: 6, micro_batch_size: 4}]}",
        *(["finetune.lora={rank: 4, alpha: 4}"] if lora else []),
        *extra,
    )
    return finetune.run_config(cfg, parent=parent.train.output_dir)


@pytest.fixture(scope="module")
def lora_run(cifar_shards, straight):
    cfg = _finetune_cfg(cifar_shards, straight, "lora")
    run_training(cfg)
    return cfg


def _unwrapped(name: str) -> str:
    return name.replace(".base_layer", "")


def test_a_lora_finetune_trains_only_the_adapters_and_records_its_lineage(straight, lora_run):
    from sfumato.models.run import load_trained

    run = RunFolder(lora_run.train.output_dir)
    resolved = load_run_config(run.root)
    lineage = resolved.train.lineage
    assert lineage.parent == straight.train.output_dir and lineage.checkpoint == "step-00000010"
    assert lineage.parent_step == 10 and lineage.select == {"tags": SUBSET} and resolved.train.lora.rank == 4
    # Every selected id is of the subset, and the count is the manifest's rows of those classes.
    from sfumato.data.manifest import read_manifest

    ids = run.selected_ids.read_text().split()
    manifest = read_manifest(lora_run.data.output_dir / "manifest.parquet").set_index("id")
    in_subset = manifest["tags"].map(lambda tags: bool(set(SUBSET) & set(tags)))
    assert sorted(ids) == sorted(manifest.index[in_subset]) and len(ids) == lineage.selected_rows

    last = ckpt.latest(run.checkpoints)
    ema = ckpt.load_ema(last)
    assert ema and all("lora_" in k for k in ema), "the checkpoint's EMA holds the adapters only"
    parent = ckpt.load_ema(ckpt.latest(RunFolder(straight.train.output_dir).checkpoints))
    _, model, _ = load_trained(run.root)
    trainable = {n for n, _ in model.denoiser.named_parameters() if "lora_" in n}
    assert trainable == set(ema)
    share = sum(p.numel() for n, p in model.denoiser.named_parameters() if n in trainable) / sum(
        p.numel() for p in model.denoiser.parameters()
    )
    assert share <= 0.05, f"{share:.1%} of the parameters are adapters"
    for name, param in model.denoiser.named_parameters():
        if name not in trainable:
            assert torch.equal(param, parent[_unwrapped(name)]), f"base weight {name} changed"
    assert any(ema[k].abs().sum() > 0 for k in ema if "lora_B" in k), "the adapters learnt nothing"
    # Only the adapters and their optimizer state are saved by DeepSpeed.
    state = torch.load(last / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert state and all("lora_" in k for k in state)
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    parent_size = sum(
        p.stat().st_size
        for p in ckpt.latest(RunFolder(straight.train.output_dir).checkpoints).rglob("*")
        if p.is_file()
    )
    assert size < parent_size / 5
    metrics = [m for m in read_jsonl(run.metrics) if "loss" in m]
    assert metrics[-1]["step"] == 6 and all(m["resolution_px"] == 32 for m in metrics)


def _adapter_draws_the_merged_export_without_sfumato(base: dict, tuned: dict) -> None:
    """In a process that cannot import sfumato, diffusers' load_lora_weights puts the tuned run's
    exported adapter on the base export, which then draws what the merged export draws."""
    assert tuned["lora"]["adapter"].endswith("lora") and tuned["lora"]["trainable_parameters"] > 0
    script = f"""
import torch
from diffusers import DiffusionPipeline
def draw(pipe):
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(batch_size=2, class_labels=[0, 2], generator=g, num_inference_steps=4, output_type="pt").images
base = DiffusionPipeline.from_pretrained({base["diffusers"]!r}, trust_remote_code=True)
before = draw(base)
base.load_lora_weights({tuned["lora"]["adapter"]!r})
adapted = draw(base)
merged = draw(DiffusionPipeline.from_pretrained({tuned["diffusers"]!r}, trust_remote_code=True))
print("DIFF", float((adapted - merged).abs().max()), float((adapted - before).abs().max()))
"""
    out = subprocess.run([sys.executable, "-I", "-c", NO_SFUMATO + script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    merged_diff, adapter_effect = map(float, out.stdout.split("DIFF")[1].split())
    assert merged_diff < 1e-3, "base + adapter differs from the merged export"
    assert adapter_effect > 1e-3, "the adapter changed nothing"


def test_the_adapter_loads_in_diffusers_without_sfumato_and_matches_the_merged_export(straight, lora_run, tmp_path):
    from sfumato.export.export_run import run_export

    base = run_export(straight.train.output_dir, overrides=["export.onnx=false"], out_dir=tmp_path / "base")
    tuned = run_export(lora_run.train.output_dir, overrides=["export.onnx=false"], out_dir=tmp_path / "tuned")
    _adapter_draws_the_merged_export_without_sfumato(base, tuned)
    # The endpoint serves the base export plus the adapter as it serves the merged export.
    from sfumato.serve.backends import load_backend

    served, merged = (
        load_backend(tmp_path / "base", "torch", lora=tmp_path / "tuned" / "lora"),
        load_backend(tmp_path / "tuned", "torch"),
    )
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(
            served.pipe.unet(x, t, class_labels=torch.tensor([0, 2])).sample,
            merged.pipe.unet(x, t, class_labels=torch.tensor([0, 2])).sample,
            atol=1e-4,
            rtol=1e-3,
        )
    with pytest.raises(ValueError, match="torch backend"):
        load_backend(tmp_path / "base", "onnx", lora=tmp_path / "tuned" / "lora")

    # Named adapters, not fused: a job naming one runs the merged export's network; every other
    # job the base's, before and after (switching leaves nothing behind).
    from sfumato.serve.backends import Job

    plain = load_backend(tmp_path / "base", "torch")
    both = load_backend(tmp_path / "base", "torch", adapters={"tuned": tmp_path / "tuned" / "lora"})

    def draw(model):
        """Generate one job through the backend's routing, then the network it left active."""
        job = Job(
            "j",
            seed=3,
            steps=2,
            guidance_scale=1.0,
            num_images=1,
            sampler="ddim",
            width=32,
            height=32,
            class_label=2,
            model=model,
        )
        both.generate([job])
        with torch.no_grad():
            return both.pipe.unet(x, t, class_labels=torch.tensor([0, 2])).sample

    def net(backend):
        with torch.no_grad():
            return backend.pipe.unet(x, t, class_labels=torch.tensor([0, 2])).sample

    base_out, merged_out = net(plain), net(merged)
    assert (base_out - merged_out).abs().max() > 1e-3, "the adapter changes the network"
    torch.testing.assert_close(draw("base"), base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(draw("tuned"), merged_out, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(draw("base"), base_out, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_killed_lora_finetune_resumes_to_the_same_weights(cifar_shards, straight, lora_run):
    killed = _finetune_cfg(cifar_shards, straight, "lora-killed")
    run_training(killed, hooks=[KillWorkerAt(4)])  # after the step-3 checkpoint
    assert (killed.train.output_dir / ".injected").read_text() == "4"
    a = ckpt.load_ema(ckpt.latest(lora_run.train.output_dir / "checkpoints"))
    b = ckpt.load_ema(ckpt.latest(killed.train.output_dir / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapters differ after the resume"


def test_a_filter_that_selects_nothing_fails_before_any_work(cifar_shards, straight):
    with pytest.raises(ValueError, match=r"finetune\.select\.caption_contains leaves no row"):
        _finetune_cfg(cifar_shards, straight, "empty", "finetune.select.caption_contains=no such words")
    assert not (cifar_shards / "empty").exists()
    with pytest.raises(ValueError, match=r"train\.output_dir to a folder of its own"):
        finetune.run_config(
            run_config(
                cifar_shards,
                "straight",
                "finetune.select.tags=[bird]",
                f"finetune.overrides={{train.output_dir: {straight.train.output_dir}}}",
            ),
            parent=straight.train.output_dir,
        )


def test_a_full_finetune_starts_from_the_parents_ema_weights(cifar_shards, straight):
    """No LoRA: every weight trains, starting from the parent's EMA weights."""
    from sfumato.models.run import build_run_model

    cfg = _finetune_cfg(cifar_shards, straight, "full", lora=False)
    assert cfg.train.lora is None and cfg.train.lineage is not None and cfg.train.output_dir == cifar_shards / "full"
    model = build_run_model(cfg).denoiser
    parent = ckpt.load_ema(ckpt.latest(RunFolder(straight.train.output_dir).checkpoints))
    assert all(p.requires_grad and torch.equal(p, parent[n]) for n, p in model.named_parameters())


def test_a_finetune_starts_from_a_diffusers_export_and_refuses_a_folder_without_one(cifar_shards, straight, tmp_path):
    """finetune.pretrained / --pretrained: the network of a diffusers folder (here the parent's
    own export, which holds its EMA weights), not a run folder; a folder without one is a clear
    error naming the key."""
    from sfumato.export.export_run import run_export
    from sfumato.models.run import build_run_model

    exported = run_export(straight.train.output_dir, overrides=["export.onnx=false"], out_dir=tmp_path / "base")
    tree = run_config(
        cifar_shards,
        "straight",
        "finetune.select.tags=[bird]",
        f"finetune.overrides={{train.output_dir: {tmp_path / 'tuned'}}}",
    )
    cfg = finetune.run_config(tree, pretrained=exported["diffusers"])
    assert cfg.train.lineage.pretrained == exported["diffusers"] and cfg.train.lineage.parent is None
    model = build_run_model(cfg).denoiser
    parent = ckpt.load_ema(ckpt.latest(RunFolder(straight.train.output_dir).checkpoints))
    assert all(torch.equal(p, parent[n]) for n, p in model.named_parameters()), "the export's weights, unchanged"
    elsewhere = finetune.run_config(tree, pretrained=str(tmp_path / "base" / "no-such"))
    with pytest.raises(ValueError, match=r"finetune\.pretrained=.*no-such"):
        build_run_model(elsewhere)


def test_a_text_finetune_selects_by_caption_and_keeps_the_parents_tokenizer(text_run):
    """finetune.select.caption_contains on a text run: the fine-tune's batches are the frog photos
    alone, its weights (text encoder included) start as the parent's, and its tokenizer is the
    parent's even when the config would now train another (train.text.vocab_size changed)."""
    from sfumato.config import run_tree, validated
    from sfumato.data.manifest import read_manifest
    from sfumato.models.run import build_run_model
    from sfumato.train.loop import prepare_run
    from sfumato.train.tasks import FineTuning, make_task

    out = text_run.train.output_dir.parent / "text-frogs"
    tree = run_tree(text_run)
    tree["finetune"] = {
        "select": {"caption_contains": "FROG"},
        "overrides": {"train.output_dir": str(out), "train.text.vocab_size": 300},
    }
    cfg = finetune.run_config(validated(tree, "test"), parent=text_run.train.output_dir)
    manifest = read_manifest(text_run.data.output_dir / "manifest.parquet")
    frogs = manifest[manifest["caption"].str.contains("frog") & (manifest["status"] == "ok")]
    assert cfg.train.lineage.selected_rows == len(frogs) > 0 and cfg.train.text.vocab_size == 300

    prepare_run(cfg)
    run, parent = RunFolder(out), RunFolder(text_run.train.output_dir)
    assert sorted(run.selected_ids.read_text().split()) == sorted(frogs["id"])
    assert (run.tokenizer / "tokenizer.json").read_text() == (parent.tokenizer / "tokenizer.json").read_text()
    model = build_run_model(cfg)
    weights = ckpt.load_ema(ckpt.latest(parent.checkpoints))
    assert all(torch.equal(p, weights[n]) for n, p in model.denoiser.named_parameters()), "the parent's weights"
    task = make_task(cfg, model)
    assert isinstance(task, FineTuning)
    batches = task.batches(0, 0, 1, None)
    captions = [caption for _ in range(3) for caption in next(batches)[0]["caption"]]
    assert captions and all("frog" in caption for caption in captions), captions


@pytest.mark.slow  # a LoRA fine-tune on Ray Train + DeepSpeed and two exports: minutes on 2 cores
def test_a_dit_run_finetunes_with_lora_and_in_full(cifar_shards, dit_run, tmp_path):
    """A DiT run's LoRA fine-tune trains only its adapters on ZeRO-2, and its exported adapter,
    on the base DiT's export, draws the merged export's images where sfumato cannot be imported;
    a full fine-tune starts from the DiT's weights, from the run or from its diffusers export."""
    from sfumato.export.export_run import run_export
    from sfumato.models.run import build_run_model

    # The parent's 10 debug steps leave its adaLN-zero gates near zero, which damp whatever an
    # adapter does (~2e-6 in pixels at the UNet test's settings): a bolder rate, and an EMA that
    # follows the 6 steps, let the adapter show in the images.
    cfg = _finetune_cfg(
        cifar_shards, dit_run, "dit-lora", "finetune.lora.learning_rate=0.05", "train.ema.halflife_samples=16"
    )
    run_training(cfg)
    ema = ckpt.load_ema(ckpt.latest(RunFolder(cfg.train.output_dir).checkpoints))
    assert ema and all("lora_" in k for k in ema) and any(ema[k].abs().sum() > 0 for k in ema if "lora_B" in k)
    base = run_export(dit_run.train.output_dir, overrides=["export.onnx=false"], out_dir=tmp_path / "base")
    tuned = run_export(cfg.train.output_dir, overrides=["export.onnx=false"], out_dir=tmp_path / "tuned")
    _adapter_draws_the_merged_export_without_sfumato(base, tuned)

    parent = ckpt.load_ema(ckpt.latest(RunFolder(dit_run.train.output_dir).checkpoints))
    full = _finetune_cfg(cifar_shards, dit_run, "dit-full", lora=False)
    tree = run_config(
        cifar_shards,
        "dit",
        "train.model=dit-tiny",
        "finetune.select.tags=[bird]",
        f"finetune.overrides={{train.output_dir: {tmp_path / 'from-export'}}}",
    )
    from_export = finetune.run_config(tree, pretrained=base["diffusers"])
    for cfg in (full, from_export):
        model = build_run_model(cfg).denoiser
        assert all(p.requires_grad and torch.equal(p, parent[n]) for n, p in model.named_parameters())

"""Frozen pretrained text encoders end to end on local Ray (issue 34 item 5): a tiny random
CLIPTextModel or T5EncoderModel saved as a pretrained folder, its caption states cached by the
cache stage, a text run of two DeepSpeed workers that trains from the cache without running the
encoder in any step and leaves it exactly as loaded, and an export that takes prompts."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("onnxruntime")

from helpers import run_config  # noqa: E402
from sfumato import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.slow  # a cache build, a training run and an export per encoder: minutes


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_a_frozen_encoder_run_trains_from_the_cache_and_exports_with_its_encoder(kind, cifar_shards):
    from diffusers import DiffusionPipeline

    from sfumato.export.export_run import run_export
    from sfumato.models.cache import run_cache
    from sfumato.testing.tiny import save_tiny_text_encoder
    from sfumato.train.faults import TextEncoderMustNotRun
    from sfumato.train.loop import run_training

    source = cifar_shards / f"pretrained-{kind}"
    saved = save_tiny_text_encoder(source, kind)
    cfg = run_config(
        cifar_shards,
        f"frozen-{kind}",
        "train.model=unet-text-tiny",
        "train.conditioning=text",
        f"train.text.encoder={kind}",
        f"train.text.pretrained={source}",
        "train.text.encoder_subfolder=text_encoder",
        "train.text.tokenizer_subfolder=tokenizer",
        "train.text.train_encoder=false",
        "train.text.max_length=12",
        "train.max_failures=0",  # the hook's error ends the run at once
    )
    summary = run_cache(cfg)
    assert summary.files == summary.built > 0 and summary.resolutions_px == [16, 32]
    run_training(cfg, hooks=[TextEncoderMustNotRun()])

    run = cfg.train.output_dir
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 10 and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    ema = ckpt.load_ema(ckpt.latest(run / "checkpoints"))
    assert all(torch.equal(ema[f"text_encoder.{n}"], p) for n, p in saved.named_parameters()), (
        "the frozen encoder is exactly the pretrained one, in the checkpoint the export reads"
    )

    report = run_export(run)
    assert report["onnx"]["fp32"]["sampling"]["final_sample_rel_l2"] < 1e-3, "ONNX traces the encoder too"
    folder = run / "export" / "diffusers"
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"][1] == type(saved).__name__
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]
    prompts = ["a photo of a frog", "a photo of a ship"]
    images = pipe(prompt=prompts, num_inference_steps=4, guidance_scale=3.0, generator=generators, output_type="np")
    assert images.images.shape == (2, 32, 32, 3)
    assert not np.allclose(images.images[0], images.images[1]), "same noise, other prompt: another image"

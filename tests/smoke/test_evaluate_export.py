"""Evaluation and export of real (tiny, debug) trained runs.

The diffusers export loads in a process where sfumato cannot be imported and generates exactly
the images the run generates for the same seeds, DDPM and flow-matching runs alike; the ONNX
export agrees with PyTorch (DDIM, or flow Euler) and samples on its own with numpy and
onnxruntime; evaluation writes its metrics, report and cards with the real counts of the run and
its data. sfumato's DiT (class, text by cross-attention, text by joint attention) does all of it
as the UNets do: its code travels inside the export."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("onnxruntime")

from safetensors.torch import save_file  # noqa: E402

from helpers import NO_SFUMATO, exported  # noqa: E402
from sfumato.diffusion.sample import sample  # noqa: E402
from sfumato.layout import ExportFolder  # noqa: E402
from sfumato.models.run import load_trained, pipeline  # noqa: E402

# Only torch and diffusers: the export's own pipeline code draws the images.
WITHOUT_SFUMATO = (
    NO_SFUMATO
    + """
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file
folder, reference, kwargs = sys.argv[1], sys.argv[2], eval(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
count = kwargs.pop("count")
generators = [torch.Generator().manual_seed(3 + i) for i in range(count)]
images = pipe(**kwargs, num_inference_steps=6, generator=generators, output_type="pt").images
expected = load_file(reference)["images"]
assert not [m for m in sys.modules if m.startswith("sfumato") and sys.modules[m] is not None]
print(type(pipe).__name__, type(pipe.scheduler).__name__, type(pipe.unet).__name__, torch.equal(images, expected),
      float((images - expected).abs().max()))
"""
)


def _export_and_compare(
    run_cfg, conditions, pipe_kwargs, guidance_scale: float, scheduler: str = "DDIMScheduler", unet: str | None = None
) -> dict:
    run_dir = run_cfg.train.output_dir
    # The export every module shares (made once a session): its report is the one run_export returned.
    report = json.loads(ExportFolder(exported(run_cfg)).report_json.read_text())
    cfg, run, _ = load_trained(run_dir)
    reference = sample(
        pipeline(cfg, run, cfg.export.sampler),
        len(conditions or [0, 0]),
        seed=3,
        steps=6,
        guidance_scale=guidance_scale,
        conditions=conditions,
    )
    save_file({"images": reference.contiguous()}, str(run_dir / "reference.safetensors"))
    kwargs = {**pipe_kwargs, "count": len(reference), "guidance_scale": guidance_scale}
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            WITHOUT_SFUMATO,
            str(run_dir / "export" / "diffusers"),
            str(run_dir / "reference.safetensors"),
            repr(kwargs),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    name, loaded_scheduler, loaded_unet, equal, max_diff = done.stdout.split()
    assert name == "SfumatoPipeline" and loaded_scheduler == scheduler
    assert unet is None or loaded_unet == unet, loaded_unet
    assert equal == "True", f"the export generates other images than the run (max diff {max_diff})"
    assert float(reference.std()) > 0.01, "the images are not blank"
    return report


def _check_onnx(report: dict, run_dir) -> None:
    onnx = report["onnx"]
    for check in ("batch_1", "batch_3"):
        assert onnx["fp32"][check]["max_rel"] <= 1e-4, onnx["fp32"]
        assert 0 < onnx["int8"][check]["rel_l2"] < 1, "INT8 error is measured (and it is not zero)"
    assert onnx["fp32"]["sampling"]["max_pixel_error"] < 1.0, f"a whole ONNX {onnx['sampler']} run matches PyTorch's"
    text = (run_dir / "export" / "export_report.md").read_text()
    assert "int8" in text and f"{onnx['int8']['batch_1']['rel_l2']:.2e}" in text
    files = {p.name for p in (run_dir / "export").rglob("*")}
    assert not files & {"pytorch_model.bin", "diffusion_pytorch_model.bin"}, "weights are safetensors only"


def test_class_run_exports_to_diffusers_and_onnx(straight, tmp_path):
    report = _export_and_compare(straight, [0, 1, 2, 9], {"class_labels": [0, 1, 2, 9]}, guidance_scale=2.0)
    run_dir = straight.train.output_dir
    assert report["checkpoint"] == "step-00000010" and report["parameters"] > 0
    _check_onnx(report, run_dir)
    _sample_onnx_without_sfumato(run_dir, tmp_path / "grid.png")


def _sample_onnx_without_sfumato(run_dir, grid, conditions=("--class", "3", "--class", "airplane")) -> None:
    """The standalone ONNX sampler (INT8), run as a script from the export folder, without sfumato:
    two images, of the two `conditions`."""
    onnx_dir = run_dir / "export" / "onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            NO_SFUMATO + "; import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            str(onnx_dir / "sample_onnx.py"),
            "--out",
            str(grid),
            *conditions,
            "--steps",
            "4",
            "--guidance",
            "2",
            "--model",
            "denoiser.int8.onnx",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    assert Image.open(grid).size == (64, 32), "two 32 px images side by side (the last stage's size)"


def test_flow_run_exports_its_shifted_scheduler_and_an_onnx_euler_sampler(flow_run, tmp_path):
    report = _export_and_compare(
        flow_run,
        [0, 1, 2, 9],
        {"class_labels": [0, 1, 2, 9]},
        guidance_scale=2.0,
        scheduler="FlowMatchEulerDiscreteScheduler",
    )
    run_dir = flow_run.train.output_dir
    exported = run_dir / "export"
    scheduler = json.loads((exported / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0, "1.5 per 16 px at the last stage's 32 px"
    spec = json.loads((exported / "onnx" / "sampler.json").read_text())
    assert spec["objective"] == "flow" and spec["shift"] == 3.0 and spec["num_train_timesteps"] == 1000
    assert "alphas_cumprod" not in spec and report["onnx"]["sampler"] == "flow-euler"
    _check_onnx(report, run_dir)
    assert report["onnx"]["fp32"]["sampling"]["final_sample_rel_l2"] < 1e-4, "Euler on diffusers' very sigmas"
    assert "flow-euler run of the onnxruntime sampler" in (exported / "export_report.md").read_text()
    _sample_onnx_without_sfumato(run_dir, tmp_path / "grid.png")


def test_text_run_exports_its_encoder_and_tokenizer(text_run, tmp_path):
    """The diffusers folder draws the run's images of the same prompts without sfumato; the ONNX
    graph holds the text encoder, its sampler reads prompts with the export's tokenizer.json into
    the pipeline's very token ids (a prompt longer than the model reads cut as the pipeline cuts
    it), and the standalone script takes --prompt."""
    prompts = ["a photo of a frog", "a photo of a ship"]
    report = _export_and_compare(text_run, prompts, {"prompt": prompts}, guidance_scale=3.0)
    run_dir = text_run.train.output_dir
    _check_onnx(report, run_dir)
    exported = run_dir / "export" / "diffusers"
    assert (exported / "text_encoder" / "model.safetensors").exists() and (exported / "tokenizer").is_dir()

    import onnx

    from sfumato.export.onnx_sampler import OnnxSampler

    graph = onnx.load(str(run_dir / "export" / "onnx" / "denoiser.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["sample", "timestep", "cond"]
    assert graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.INT64, "cond: token ids, not states"
    assert any("text_model" in w.name or "token_embedding" in w.name for w in graph.initializer), (
        "the encoder's weights"
    )
    cfg, run, _ = load_trained(run_dir)
    sampler = OnnxSampler(run_dir / "export" / "onnx")
    long_prompt = "a photo of a frog on a ship in the rain at night"
    written = [*prompts, long_prompt, ""]
    onnx_ids, _ = sampler._conditions(written, None, len(written))
    torch_ids = pipeline(cfg, run, "ddim").tokenize(written)
    assert len(run.tokenizer(long_prompt).input_ids) > cfg.train.text.max_length, "the long prompt is cut"
    assert torch.equal(torch.from_numpy(onnx_ids), torch_ids)
    # Negative prompts: the ONNX sampler guides away from them as the pipeline does, from the same noise.
    negatives = ["a photo of a ship", ""]
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    guided = dict(num_inference_steps=4, guidance_scale=3.0, latents=noise, output_type="np")
    expected = pipeline(cfg, run, "ddim")(prompt=prompts, negative_prompt=negatives, **guided).images
    drawn = sampler(prompts, None, 2, steps=4, guidance_scale=3.0, noise=noise.numpy(), negative_prompts=negatives)
    plain = sampler(prompts, None, 2, steps=4, guidance_scale=3.0, noise=noise.numpy())
    assert abs(drawn - expected).max() * 255 < 0.5 < abs(plain - expected).max() * 255
    _sample_onnx_without_sfumato(run_dir, tmp_path / "grid.png", ("--prompt", prompts[0], "--prompt", prompts[1]))


def _check_shipped_dit(run_dir) -> None:
    """The DiT's own code is in the export, where diffusers looks for a custom component
    (`<component>/<module>.py`, the module named in model_index.json)."""
    folder = run_dir / "export" / "diffusers"
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["sfumato_dit", "SfumatoDiT"]
    assert (folder / "unet" / "sfumato_dit.py").is_file()


# The DiT runs' training and ONNX export cost a couple of minutes each on 2 cores: the default tier
# keeps the text DiT (cross-attention: the main product, and the run test_dit_lifecycle shares).
@pytest.mark.slow
def test_class_dit_run_exports_to_diffusers_and_onnx(dit_run, tmp_path):
    """A DiT run's export loads where sfumato cannot be imported (its network's code ships in
    unet/) and draws the run's very images; its ONNX graph agrees with PyTorch as a UNet's does."""
    report = _export_and_compare(
        dit_run, [0, 1, 2, 9], {"class_labels": [0, 1, 2, 9]}, guidance_scale=2.0, unet="SfumatoDiT"
    )
    run_dir = dit_run.train.output_dir
    assert report["model"] == "dit-tiny"
    _check_shipped_dit(run_dir)
    _check_onnx(report, run_dir)
    _sample_onnx_without_sfumato(run_dir, tmp_path / "grid.png")


@pytest.mark.parametrize("run", ["dit_text_run", pytest.param("mmdit_run", marks=pytest.mark.slow)])
def test_text_dit_runs_export_to_diffusers_and_onnx(run, request, tmp_path):
    """Text by cross-attention (dit-text-tiny) and by joint attention (mmdit-tiny): the export
    draws the run's images of the same prompts without sfumato, and the ONNX graph, text encoder
    inside, samples prompts as the pipeline does."""
    run_cfg = request.getfixturevalue(run)
    prompts = ["a photo of a frog", "a photo of a ship"]
    report = _export_and_compare(run_cfg, prompts, {"prompt": prompts}, guidance_scale=3.0, unet="SfumatoDiT")
    run_dir = run_cfg.train.output_dir
    _check_shipped_dit(run_dir)
    _check_onnx(report, run_dir)
    _sample_onnx_without_sfumato(run_dir, tmp_path / "grid.png", ("--prompt", prompts[0], "--prompt", prompts[1]))


def test_latent_run_exports_its_vae(latent_run):
    report = _export_and_compare(latent_run, [4, 5], {"class_labels": [4, 5]}, guidance_scale=1.0)
    _check_onnx(report, latent_run.train.output_dir)
    assert (latent_run.train.output_dir / "export" / "onnx" / "vae_decoder.onnx").exists()


def test_evaluate_writes_metrics_report_and_cards_with_real_counts(straight, tmp_path):
    import pyarrow.parquet as pq

    from sfumato.cli import main
    from sfumato.models.registry import parameter_count
    from sfumato.testing.tiny import save_tiny_clip

    save_tiny_clip(tmp_path / "clip")
    run_dir = straight.train.output_dir
    overrides = [
        "evaluate.num_samples=24",
        "evaluate.batch_size=10",
        "evaluate.steps=4",
        f"evaluate.clip_model={tmp_path / 'clip'}",
        "evaluate.reference_max_images=40",
    ]
    assert main(["evaluate", str(run_dir), *overrides]) == 0
    cache = sorted((straight.data.output_dir / "fid_cache").iterdir())
    assert main(["evaluate", str(run_dir), *overrides, "evaluate.guidance_scale=3"]) == 0
    assert sorted((straight.data.output_dir / "fid_cache").iterdir()) == cache, "reference statistics were cached"

    first, second = [json.loads(x) for x in (run_dir / "evaluation" / "metrics.jsonl").read_text().splitlines()]
    assert first["metric"] == second["metric"] == "FD-CLIP" and first["features"].startswith("clip:")
    assert first["num_samples"] == 24 and first["reference"]["count"] == 40 and first["step"] == 10
    assert first["fd"] > 0 and 0 <= first["clip_score"] <= 100
    assert first["fd"] != second["fd"], "guidance changes the images and so the distance"
    assert (run_dir / "evaluation" / "samples-step-00000010.png").exists()
    # The offline yardstick runs beside FD-CLIP: a class-conditional run gets class accuracy with its
    # ceiling, floor and a confusion matrix counting every sample, from one cached classifier (on
    # this tiny set the classifier learns little: tests/unit/test_domain.py checks what it tells).
    domain = first["domain"]
    assert all(0 <= domain[k] <= 1 for k in ("class_accuracy", "real_accuracy", "noise_accuracy"))
    assert sum(map(sum, domain["confusion"])) == 24 and domain["fd_domain"] < domain["noise_fd_domain"]
    assert second["domain"]["yardstick"]["fingerprint"] == domain["yardstick"]["fingerprint"]
    assert len(list((straight.data.output_dir / "domain_classifier").iterdir())) == 1, "trained once, then cached"
    # Beside each figure what real images give: real training images at the sample's count (the
    # FD floor), a real sample's coverage, and each sample's nearest training image with the
    # closest pairs drawn for the report (tests/unit/test_memorisation.py checks what they tell).
    assert 0 <= domain["fd_domain_floor"] < domain["noise_fd_domain"] and domain["floor_count"] <= 24
    assert 0 <= domain["coverage"] <= 1 and 0 <= domain["coverage_real"] <= 1
    m = domain["memorisation"]
    assert 0 <= m["copies"] <= m["closer_than_real"] <= 1 and len(m["closest_pairs"]) == 8
    assert (run_dir / "evaluation" / second["domain"]["memorisation"]["pairs_grid"]).is_file()
    # A guided evaluation scores the same noise and classes at guidance 1 too; an unguided one once.
    assert "domain_unguided" not in first and first["guidance_scale"] == 1
    unguided = second["domain_unguided"]
    assert sum(map(sum, unguided["confusion"])) == 24 and unguided["fd_domain"] == pytest.approx(domain["fd_domain"])

    report = (run_dir / "report.md").read_text()
    assert "FD-CLIP" in report and f"{first['fd']:.3f}" in report
    assert "Domain yardstick" in report and f"{second['domain']['fd_domain']:.4g}" in report
    assert "### Memorisation" in report and second["domain"]["memorisation"]["pairs_grid"] in report
    manifest = pq.read_table(straight.data.output_dir / "manifest.parquet")
    rejects = pq.read_table(straight.data.output_dir / "rejects.parquet")
    card = json.loads((straight.data.output_dir / "dataset_card.json").read_text())
    assert card["manifest_rows"] == manifest.num_rows and card["rejected"] == rejects.num_rows
    assert card["inputs"] == manifest.num_rows + rejects.num_rows
    data_card = (straight.data.output_dir / "dataset_card.md").read_text()
    assert str(manifest.num_rows + rejects.num_rows) in data_card and "research-only" in data_card
    _, run, _ = load_trained(run_dir)
    model_card = (run_dir / "model_card.md").read_text()
    assert f"{parameter_count(run.denoiser):,}" in model_card and "unet-tiny" in model_card
    assert f"{first['fd']:.3f}" in model_card and "Domain yardstick" in model_card

"""Guidance limited to an interval of noise levels (Kynkäänniemi et al. 2024) on real (tiny, debug)
trained runs: `sfumato evaluate` draws and records with `evaluate.guidance_interval`, and the ONNX
export's standalone sampler guides at the very steps the PyTorch pipeline does, its final sample
the pipeline's within the tolerance the export itself is held to, DDIM and flow Euler alike."""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("onnxruntime")

from helpers import exported  # noqa: E402
from sfumato.export.onnx_export import SAMPLING_TOLERANCE  # noqa: E402
from sfumato.export.onnx_sampler import SAMPLERS, OnnxSampler  # noqa: E402
from sfumato.models.run import load_trained, pipeline  # noqa: E402


def test_evaluate_draws_and_records_with_its_guidance_interval(straight, tmp_path):
    """Four DDIM steps sit at noise levels 0.999 .. 0.249: at guidance 3, an interval of [0, 0]
    draws the unguided evaluation's images, [0.3, 0.8] images unlike both; the record and the
    report say which interval was used. On a copy of the run, so its own evaluations stay two."""
    from sfumato.evaluate.evaluate import run_evaluate

    run_dir = tmp_path / "run"
    shutil.copytree(straight.train.output_dir, run_dir, ignore=shutil.ignore_patterns("export", "evaluation"))
    common = ["evaluate.num_samples=4", "evaluate.batch_size=4", "evaluate.steps=4", "evaluate.sampler=ddim"]
    records, grids = {}, {}
    for name, guidance in [
        ("unguided", ["evaluate.guidance_scale=1"]),
        ("guided", ["evaluate.guidance_scale=3"]),
        ("none", ["evaluate.guidance_scale=3", "evaluate.guidance_interval=[0, 0]"]),
        ("middle", ["evaluate.guidance_scale=3", "evaluate.guidance_interval=[0.3, 0.8]"]),
    ]:
        records[name] = run_evaluate(run_dir, overrides=common + guidance)
        grids[name] = (run_dir / "evaluation" / f"samples-{records[name]['checkpoint']}.png").read_bytes()
    assert grids["guided"] != grids["unguided"], "guidance changes this model's images: the test can tell"
    assert grids["none"] == grids["unguided"]
    assert grids["middle"] not in (grids["guided"], grids["unguided"])
    assert records["middle"]["guidance_interval"] == [0.3, 0.8] and "guidance_interval" not in records["guided"]
    assert "3 at noise [0.3, 0.8]" in (run_dir / "report.md").read_text()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("run", ["straight", "flow_run"])
def test_the_onnx_sampler_guides_inside_the_interval_as_the_pipeline_does(run, request):
    run_cfg = request.getfixturevalue(run)
    sampler = OnnxSampler(exported(run_cfg) / "onnx")
    cfg, model, _ = load_trained(run_cfg.train.output_dir)
    pipe = pipeline(cfg, model, SAMPLERS[cfg.diffusion.objective])  # the sampler the export is checked against
    labels, config = [0, 1, 2, 9], pipe.unet.config
    shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    finals = {}
    for interval in (None, (0.3, 0.8), (0.0, 0.0)):
        guided = dict(guidance_scale=3.0, guidance_interval=interval)
        expected = pipe(class_labels=labels, num_inference_steps=8, latents=noise, output_type="latent", **guided)
        expected = expected.images.double().numpy()
        drawn = sampler(None, labels, len(labels), steps=8, noise=noise.numpy(), raw=True, **guided)
        assert _relative(drawn, expected) <= SAMPLING_TOLERANCE, (interval, _relative(drawn, expected))
        finals[interval] = expected
    # The interval moves the samples well beyond the tolerance, so a sampler ignoring it would fail.
    assert _relative(finals[(0.3, 0.8)], finals[None]) > 10 * SAMPLING_TOLERANCE
    assert _relative(finals[(0.3, 0.8)], finals[(0.0, 0.0)]) > 10 * SAMPLING_TOLERANCE

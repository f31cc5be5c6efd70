"""sfumato's DiT after training, as a user lives it: a tiny text DiT run (dit-text-tiny) is
evaluated, exported, served over the real HTTP endpoint, and its export, loaded by diffusers in a
process that cannot import sfumato, draws the very pixels the endpoint served."""

import io
import json
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("onnxruntime")
requests = pytest.importorskip("requests")

from helpers import NO_SFUMATO, exported  # noqa: E402
from sfumato.layout import RunFolder, read_jsonl, read_metrics  # noqa: E402

JOB = {"prompt": "a photo of a frog", "seed": 5, "steps": 4, "guidance_scale": 3.0, "sampler": "ddim"}

# The export's own pipeline and scheduler (DDIM: the export's sampler), torch and diffusers only:
# JOB's image as the endpoint draws it (seed s: a generator seeded s), in uint8 levels.
DRAW_WITHOUT_SFUMATO = (
    NO_SFUMATO
    + """
import numpy as np, torch
from diffusers import DiffusionPipeline
folder, job, out = sys.argv[1], eval(sys.argv[2]), sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe.scheduler).__name__ == "DDIMScheduler", type(pipe.scheduler).__name__
images = pipe(prompt=[job["prompt"]], negative_prompt=[""], num_inference_steps=job["steps"],
              guidance_scale=job["guidance_scale"], generator=[torch.Generator().manual_seed(job["seed"])],
              output_type="np").images
assert not [m for m in sys.modules if m.startswith("sfumato") and sys.modules[m] is not None]
np.save(out, (images[0] * 255).round().clip(0, 255).astype(np.uint8))
print(type(pipe.unet).__name__)
"""
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_one_prompt(export) -> tuple[dict, bytes]:
    """The export behind Serve's HTTP proxy (replicas reserving no CPU: training fixtures of later
    modules need the session's two), its /v1/model and its answer to JOB; Serve shut down after."""
    from ray import serve

    from sfumato.serve.app import ServeSettings, run_server

    url = f"http://127.0.0.1:{_free_port()}"
    settings = ServeSettings(model=str(export), num_cpus=0, request_timeout_s=120.0)
    try:
        run_server(settings, port=int(url.rsplit(":", 1)[1]), blocking=False, name="dit-text", route_prefix="/")
        info = requests.get(f"{url}/v1/model", timeout=60).json()
        answer = requests.post(f"{url}/v1/generate", json=JOB, timeout=120)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
        return info, answer.content
    finally:
        serve.shutdown()


@pytest.mark.slow  # evaluation, export with ONNX, a Serve app and a diffusers process: ~75 s on 2 busy cores
def test_a_text_dit_run_evaluates_exports_serves_a_prompt_and_loads_without_sfumato(dit_text_run, tmp_path):
    import numpy as np
    from PIL import Image

    from sfumato.cli import main
    from sfumato.testing.tiny import save_tiny_clip

    run_dir = dit_text_run.train.output_dir
    trained = [m for m in read_metrics(RunFolder(run_dir).metrics) if "loss" in m]
    assert trained[-1]["step"] == dit_text_run.train.total_steps and np.isfinite(trained[-1]["loss"])

    # Evaluate: FD-CLIP and CLIPScore of its images of the training captions (a tiny random CLIP).
    save_tiny_clip(tmp_path / "clip")
    settings = [
        "evaluate.num_samples=8",
        "evaluate.batch_size=8",
        "evaluate.steps=2",
        f"evaluate.clip_model={tmp_path / 'clip'}",
        "evaluate.reference_max_images=40",
        "evaluate.domain.enabled=false",
    ]
    assert main(["evaluate", str(run_dir), *settings]) == 0
    record = read_jsonl(RunFolder(run_dir).evaluations)[-1]
    assert record["num_samples"] == 8 and record["fd"] > 0 and 0 <= record["clip_score"] <= 100
    card = (run_dir / "model_card.md").read_text()
    assert "`dit-text-tiny`" in card and "sfumato's DiT" in card and "cross-attending" in card

    # Export, serve, and draw the same prompt where sfumato cannot be imported.
    export = exported(dit_text_run)
    info, png = _serve_one_prompt(export)
    assert info["conditioning"] == "text" and "ddim" in info["samplers"], info
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert served.shape == (32, 32, 3), "the last stage's 32 px"
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            DRAW_WITHOUT_SFUMATO,
            str(export / "diffusers"),
            repr(JOB),
            str(tmp_path / "drawn.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["SfumatoDiT"]
    drawn = np.load(tmp_path / "drawn.npy")
    assert np.array_equal(drawn, served), "diffusers alone draws the pixels the endpoint served"
    assert served.std() > 2, "not a blank image"
    assert json.loads((export / "export_report.json").read_text())["model"] == "dit-text-tiny"

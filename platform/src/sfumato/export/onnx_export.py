"""The denoiser as ONNX (dynamic batch axis), checked against PyTorch, and its INT8 copy.

`torch.onnx.export(dynamo=True)` traces `predict(unet, sample, timestep, cond, text_encoder)`,
the very function sfumato samples with, so a text model's ONNX graph holds its text encoder too
and takes token ids. The export is verified three ways and the figures go into the export report:
onnx.checker (full check), the ONNX output against PyTorch on fixed random inputs at two batch
sizes (the batch axis really is dynamic), and a whole sampling run of the standalone onnxruntime
sampler (DDIM for DDPM models, Euler for flow-matching ones) against the PyTorch pipeline with the
same sampler from the same starting noise. INT8 is onnxruntime's dynamic quantisation (weights to
int8, activations quantised on the fly), measured against fp32 on the same inputs: it trades
accuracy for size (0.27x); whether it is faster depends on the CPU (on this AVX2 machine it is
not at batch 8: BENCHMARKS.md, `sfumato bench export`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

import sfumato.export.onnx_sampler as onnx_sampler
from sfumato.diffusion.pipeline import null_class, predict
from sfumato.diffusion.sample import is_flow

ONNX_TOLERANCE = 1e-4
"""Largest |onnx - torch| of the fp32 denoiser output, relative to the output's largest magnitude,
that the export accepts (measured: ~2e-6 on the tiny UNet, ~4e-7 on the tiny DiTs, class, cross- and
joint-attention text; float32 reassociation, not a bug)."""
SAMPLING_TOLERANCE = 1e-3
"""Largest relative L2 distance between the final samples of the fp32 ONNX sampler and the PyTorch
pipeline (same sampler, same noise, 10 steps) that the export accepts (measured: ~4e-7 for DDIM
and flow Euler on the tiny UNet, ~1.5e-7 for DDIM on the tiny DiTs): above it the standalone sampler
does not follow the model's."""


class _Denoiser(torch.nn.Module):
    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return predict(self.unet, sample, timestep, cond, self.text_encoder)


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def conditioning(pipe) -> str:
    return "text" if pipe.text_encoder is not None else ("class" if pipe.num_classes else "none")


def example_inputs(pipe, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Fixed random inputs: noise, timesteps spread over the schedule (integers for DDPM models,
    t x num_train_timesteps in float32 for flow-matching ones: the graph's input type follows),
    conditions incl. "none"."""
    g = torch.Generator().manual_seed(seed)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    total = pipe.scheduler.config.num_train_timesteps
    timestep = (
        torch.rand(batch, generator=g) * total
        if is_flow(pipe.scheduler.config)
        else torch.randint(0, total, (batch,), generator=g)
    )
    inputs = {"sample": torch.randn(batch, c, size, size, generator=g), "timestep": timestep}
    kind = conditioning(pipe)
    if kind == "text":
        inputs["cond"] = pipe.tokenize(["a photo"] * (batch - 1) + [""])
    elif kind == "class":
        inputs["cond"] = torch.randint(0, pipe.num_classes + 1, (batch,), generator=g)
    return inputs


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path, output: str, opset: int) -> None:
    import logging

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated constant
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    torch.onnx.export(
        module.eval(),
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=[output],
        dynamic_shapes={name: {0: batch} for name in inputs},
        opset_version=opset,
        dynamo=True,
        verbose=False,
        external_data=weight_bytes > 1.5 * 2**30,
    )  # protobuf's 2 GiB limit: weights beside the graph
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def quantize_int8(fp32: Path, int8: Path) -> None:
    """onnxruntime dynamic quantisation: the weights of Conv, MatMul and Gemm nodes to 8 bits,
    activations quantised on the fly.

    Weights are unsigned (QUInt8): on this AVX2 CPU without VNNI, unet-s at 32 px came out at
    2.5e-2 relative error with them against 8.5e-2 with signed weights, whose int8 x int8 path
    can saturate on AVX2 (onnxruntime's quantization docs), at the same file size (0.27x).

    It runs on a copy without the intermediate shapes the exporter recorded: onnx's shape
    inference, which the quantiser runs first, contradicts some of them after the reshapes in
    attention ("Inferred shape and existing shape differ in dimension 0") and stops; without
    them it infers its own."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    shapeless = int8.with_name(int8.stem + ".shapeless.onnx")
    onnx.save(model, str(shapeless))
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per tensor, on the root logger
    try:
        quantize_dynamic(str(shapeless), str(int8), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)
        shapeless.unlink()


def _errors(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    scale = float(np.abs(reference).max()) or 1.0
    return {
        "max_abs": float(np.abs(reference - other).max()),
        "max_rel": float(np.abs(reference - other).max() / scale),
        "rel_l2": float(np.linalg.norm(reference - other) / (np.linalg.norm(reference) or 1.0)),
    }


def _run(session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def sampler_spec(pipe, scheduler) -> dict:
    """What sample_onnx.py needs besides the graph: the objective and its schedule (DDPM: abar_t
    and the prediction type, of `scheduler`, a DDIMScheduler; flow: the time shift of a
    FlowMatchEulerDiscreteScheduler), and the conditioning."""
    tokenizer = pipe.tokenizer
    config = scheduler.config
    if is_flow(config):
        schedule = {"objective": "flow", "num_train_timesteps": config.num_train_timesteps, "shift": config.shift}
    else:
        schedule = {
            "objective": "ddpm",
            "num_train_timesteps": len(scheduler.alphas_cumprod),
            "alphas_cumprod": scheduler.alphas_cumprod.double().tolist(),
            "prediction_type": config.prediction_type,
        }
    return {
        **schedule,
        "in_channels": pipe.unet.config.in_channels,
        "sample_size": pipe.unet.config.sample_size,
        "conditioning": conditioning(pipe),
        "class_names": pipe.config.class_names or [],
        "null_class": null_class(pipe.unet),
        "text_max_length": pipe.config.text_max_length or (tokenizer.model_max_length if tokenizer else None),
        "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else None,
        "latent": pipe.vae is not None,
        "vae_scale_factor": pipe.vae_scale_factor,
        "latent_scale": pipe.config.latent_scale,
        "latent_shift": pipe.config.latent_shift,
    }


def export_onnx(pipe, scheduler, out_dir: Path, opset: int, check_batch: int, int8: bool, seed: int = 0) -> dict:
    """Write out_dir/{denoiser.onnx, denoiser.int8.onnx, sampler.json, sample_onnx.py, ...}
    (replaced whole) and return the verification figures. `scheduler`: the one the ONNX sampler
    follows, on the model's schedule (DDPM models: a DDIMScheduler, `make_sampler(cfg, "ddim")`;
    flow models: a FlowMatchEulerDiscreteScheduler with the run's shift, `make_sampler(cfg,
    "flow-euler", resolution_px)`). Raises when ONNX and PyTorch disagree beyond ONNX_TOLERANCE."""
    import onnxruntime as ort

    objective = "flow" if is_flow(scheduler.config) else "ddpm"
    expected = {"ddpm": "DDIMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}[objective]
    if type(scheduler).__name__ != expected or is_flow(pipe.scheduler.config) != (objective == "flow"):
        raise ValueError(
            f"the ONNX sampler of a {'flow-matching' if is_flow(pipe.scheduler.config) else 'DDPM'} "
            f"model follows {onnx_sampler.SAMPLERS[objective]!r} ({expected}), "
            f"not a {type(scheduler).__name__}"
        )

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    module = _Denoiser(pipe.unet, pipe.text_encoder).eval()
    export_batch = max(2, check_batch)  # torch.export specialises a dimension of size 1
    _export(module, example_inputs(pipe, export_batch, seed), work / "denoiser.onnx", "prediction", opset)
    if pipe.vae is not None:
        latents = torch.randn(
            2,
            pipe.unet.config.in_channels,
            pipe.unet.config.sample_size,
            pipe.unet.config.sample_size,
            generator=torch.Generator().manual_seed(seed),
        )
        _export(_Decoder(pipe.vae), {"latents": latents}, work / "vae_decoder.onnx", "images", opset)
    if pipe.tokenizer is not None:
        pipe.tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
    spec = sampler_spec(pipe, scheduler)
    (work / onnx_sampler.SAMPLER_JSON).write_text(json.dumps(spec))
    shutil.copyfile(onnx_sampler.__file__, work / "sample_onnx.py")

    report = {
        "opset": opset,
        "tolerance_max_rel": ONNX_TOLERANCE,
        "tolerance_sampling_rel_l2": SAMPLING_TOLERANCE,
        "sampler": onnx_sampler.SAMPLERS[objective],
        "fp32": {},
        "int8": None,
    }
    session = ort.InferenceSession(str(work / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    checks = {batch: example_inputs(pipe, batch, seed + batch) for batch in sorted({1, check_batch + 1})}
    references = {}
    with torch.no_grad():
        for batch, inputs in checks.items():
            references[batch] = module(**inputs).numpy()
            report["fp32"][f"batch_{batch}"] = _errors(references[batch], _run(session, inputs))
    worst = max(r["max_rel"] for r in report["fp32"].values())
    if not worst <= ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX denoiser differs from PyTorch by {worst:.2e} (relative), above {ONNX_TOLERANCE}")
    report["fp32"]["sampling"] = _compare_sampling(pipe, scheduler, work, "denoiser.onnx", seed)
    drift = report["fp32"]["sampling"]["final_sample_rel_l2"]
    if not drift <= SAMPLING_TOLERANCE:
        raise RuntimeError(
            f"the ONNX {report['sampler']} sampler ends {drift:.2e} (relative L2) away from the PyTorch "
            f"pipeline's {type(scheduler).__name__} from the same noise, above {SAMPLING_TOLERANCE}"
        )

    if int8:
        quantize_int8(work / "denoiser.onnx", work / "denoiser.int8.onnx")
        quantised = ort.InferenceSession(str(work / "denoiser.int8.onnx"), providers=["CPUExecutionProvider"])
        report["int8"] = {f"batch_{b}": _errors(references[b], _run(quantised, inputs)) for b, inputs in checks.items()}
        report["int8"]["sampling"] = _compare_sampling(pipe, scheduler, work, "denoiser.int8.onnx", seed)
        report["int8"]["size_ratio"] = (work / "denoiser.int8.onnx").stat().st_size / (
            work / "denoiser.onnx"
        ).stat().st_size
    (work / "onnx_report.json").write_text(json.dumps(report, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return report


def _compare_sampling(pipe, scheduler, folder: Path, model_file: str, seed: int, steps: int = 10) -> dict:
    """A whole run of the ONNX sampler against the PyTorch pipeline with `scheduler` (the same
    sampler) from the same noise: pixel error in 0-255 levels."""
    from sfumato.diffusion.pipeline import SfumatoPipeline

    sampler = onnx_sampler.OnnxSampler(folder, model_file)
    count = 2
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    noise = torch.randn(count, c, size, size, generator=torch.Generator().manual_seed(seed))
    kind = conditioning(pipe)
    prompts = ["a photo", ""] if kind == "text" else None
    labels = [0, 0] if kind == "class" else None
    guidance = 2.0 if kind != "none" else 1.0
    run = dict(steps=steps, guidance_scale=guidance, noise=noise.numpy())
    onnx_images, onnx_raw = sampler(prompts, labels, count, **run), sampler(prompts, labels, count, **run, raw=True)
    torch_pipe = SfumatoPipeline(
        **{**pipe.components, "scheduler": scheduler},
        **{k: pipe.config[k] for k in ("class_names", "text_max_length", "latent_scale", "latent_shift")},
    )
    torch_pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompts} if kind == "text" else ({"class_labels": labels} if kind == "class" else {})
    run = dict(batch_size=count, num_inference_steps=steps, guidance_scale=guidance, latents=noise)
    torch_images = torch_pipe(**kwargs, **run, output_type="np").images
    torch_raw = torch_pipe(**kwargs, **run, output_type="latent").images.double().numpy()
    diff = np.abs(onnx_images - torch_images) * 255
    # The final sample before clipping too: an undertrained model's pixels clip to 0 or 1, which
    # would hide differences from the pixel figures.
    return {
        "steps": steps,
        "images": count,
        "max_pixel_error": float(diff.max()),
        "mean_pixel_error": float(diff.mean()),
        "final_sample_rel_l2": float(np.linalg.norm(onnx_raw - torch_raw) / (np.linalg.norm(torch_raw) or 1.0)),
    }

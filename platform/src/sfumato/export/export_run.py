"""`sfumato export RUN_DIR`: a checkpoint's EMA weights as a diffusers folder, ONNX and INT8.

    RUN_DIR/export/
        diffusers/        DiffusionPipeline.from_pretrained(..., trust_remote_code=True)
        onnx/             denoiser.onnx, denoiser.int8.onnx, sampler.json, sample_onnx.py
        export_report.md  what was exported from which checkpoint, and how close ONNX/INT8 are
        export_report.json

Only the run's own files are read (its config, its tokenizer, the checkpoint's ema.safetensors;
a latent run's VAE from its configured source, safetensors only): nothing is unpickled.
"""

from __future__ import annotations

import time
from pathlib import Path

from sfumato.config import content_hash, to_dict
from sfumato.layout import ExportFolder, RunFolder, atomic_write, atomic_write_json


def run_export(
    run_dir: Path, checkpoint: str | None = None, overrides: list[str] | None = None, out_dir: Path | None = None
) -> dict:
    from sfumato import checkpoint as ckpt
    from sfumato.diffusion.sample import make_sampler
    from sfumato.export.diffusers_folder import write_diffusers
    from sfumato.export.onnx_export import export_onnx
    from sfumato.export.onnx_sampler import SAMPLERS as ONNX_SAMPLERS
    from sfumato.models.registry import parameter_count
    from sfumato.models.run import load_trained, pipeline

    run_dir = Path(run_dir)
    cfg, run, folder = load_trained(run_dir, checkpoint, overrides)
    out = ExportFolder(out_dir or RunFolder(run_dir).export)
    out.root.mkdir(parents=True, exist_ok=True)
    e = cfg.export
    step = ckpt.load_meta(folder)["step"]
    meta = {
        "run": cfg.name,
        "run_dir": str(run_dir.resolve()),
        "checkpoint": folder.name,
        "step": step,
        "model": cfg.train.model,
        "conditioning": cfg.train.conditioning,
        "config_hash": content_hash(to_dict(cfg)),
        "parameters": parameter_count(run.denoiser),
        "sampler": e.sampler,
        # the run's own guidance, as its evaluation drew: Serve's default for a request naming none
        "guidance_scale": cfg.evaluate.guidance_scale,
        "time": time.time(),
    }
    if cfg.evaluate.guidance_interval is not None:
        meta["guidance_interval"] = list(cfg.evaluate.guidance_interval)
    if cfg.trained_sizes_px is not None:
        meta["sizes_px"] = [list(size) for size in cfg.trained_sizes_px]  # the aspect buckets: what serve offers
    lora = None
    if cfg.train.lora is not None:
        lora = _export_adapter(cfg, run, out)
        meta["lineage"] = cfg.train.lineage.model_dump(mode="json", exclude_none=True)
    pipe = pipeline(cfg, run, e.sampler)
    write_diffusers(pipe, out.diffusers, meta)
    report = {**meta, "diffusers": str(out.diffusers), "onnx": None, "lora": lora}
    if e.onnx:
        # The ONNX sampler runs DDIM (DDPM runs) or flow Euler with the run's shift at the size the
        # export generates (flow runs), and is checked against the same sampler in PyTorch.
        onnx_scheduler = make_sampler(
            cfg.diffusion, ONNX_SAMPLERS[cfg.diffusion.objective], cfg.train.stages[-1].resolution_px
        )
        report["onnx"] = export_onnx(pipe, onnx_scheduler, out.onnx, e.onnx_opset, e.check_batch_size, e.int8, cfg.seed)
    atomic_write_json(out.report_json, report)
    atomic_write(out.report_md, _markdown(report, out))
    return report


def _export_adapter(cfg, run, out: ExportFolder) -> dict:
    """A LoRA run: the adapter alone in diffusers' LoRA format (out/lora, for `load_lora_weights`
    on the base export), then the adapters merged into the weights in place: the diffusers folder
    and ONNX that follow are a full model."""
    from sfumato.models.lora import LORA_WEIGHTS_FILE, merge_lora, save_adapter

    folder = out.lora
    trainable = sum(p.numel() for n, p in run.denoiser.named_parameters() if "lora_" in n)
    save_adapter(run.denoiser, folder, cfg.train.lora)
    merge_lora(run.denoiser.net)
    if run.denoiser.text_encoder is not None:
        merge_lora(run.denoiser.text_encoder)
    lineage = cfg.train.lineage
    return {
        "adapter": str(folder),
        "file": LORA_WEIGHTS_FILE,
        "trainable_parameters": trainable,
        "rank": cfg.train.lora.rank,
        "base": str(lineage.parent or lineage.pretrained),
    }


def _size_mb(path: Path) -> float:
    """A folder's, or a file's with its external weights (model.onnx.data) if any."""
    files = (
        [p for p in (path, path.with_name(path.name + ".data")) if p.is_file()]
        if not path.is_dir()
        else [p for p in path.rglob("*") if p.is_file()]
    )
    return sum(p.stat().st_size for p in files) / 2**20


def _markdown(report: dict, out: ExportFolder) -> str:
    lines = [
        f"# Export of {report['run']} at {report['checkpoint']} (step {report['step']})",
        "",
        f"Model `{report['model']}` ({report['parameters']:,} parameters, {report['conditioning']} conditioning), "
        f"EMA weights. Config hash `{report['config_hash']}`.",
        "",
        "| artefact | size (MB) | load with |",
        "| --- | ---: | --- |",
        f"| diffusers/ | {_size_mb(out.diffusers):.1f} | "
        "`DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` |",
    ]
    if report.get("lora"):
        lines.append(
            f"| lora/ | {_size_mb(out.lora):.2f} | the adapter alone ({report['lora']['trainable_parameters']:,} "
            f"parameters, rank {report['lora']['rank']}): `pipe.load_lora_weights(path)` on the export of "
            f"{report['lora']['base']}; diffusers/ holds it merged |"
        )
    onnx = report["onnx"]
    if onnx is None:
        return "\n".join(lines + ["", "ONNX export was off (export.onnx: false)."]) + "\n"
    lines.append(
        f"| onnx/denoiser.onnx | {_size_mb(out.onnx / 'denoiser.onnx'):.1f} | "
        "`python onnx/sample_onnx.py --out grid.png` |"
    )
    if onnx["int8"]:
        lines.append(
            f"| onnx/denoiser.int8.onnx | {_size_mb(out.onnx / 'denoiser.int8.onnx'):.1f} | "
            "`python onnx/sample_onnx.py --model denoiser.int8.onnx --out grid.png` |"
        )
    lines += [
        "",
        f"## Agreement with PyTorch (opset {onnx['opset']})",
        "",
        "Denoiser outputs on fixed random inputs (relative to the output's largest magnitude), and a whole "
        f"{onnx['sampler']} run of the onnxruntime sampler against the PyTorch pipeline with the same "
        "sampler from the same noise (pixel error in 0-255 levels).",
        "",
        "| model | check | max abs | max rel | rel L2 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in ("fp32", "int8"):
        for check, errors in (onnx[name] or {}).items():
            if check.startswith("batch_"):
                lines.append(
                    f"| {name} | {check.replace('_', ' ')} | {errors['max_abs']:.2e} | {errors['max_rel']:.2e} | "
                    f"{errors['rel_l2']:.2e} |"
                )
    lines += [
        "",
        "| model | sampling steps | max pixel error | mean pixel error | final sample rel L2 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("fp32", "int8"):
        if onnx[name]:
            s = onnx[name]["sampling"]
            lines.append(
                f"| {name} | {s['steps']} | {s['max_pixel_error']:.2f} | {s['mean_pixel_error']:.3f} | "
                f"{s['final_sample_rel_l2']:.2e} |"
            )
    lines += [
        "",
        f"fp32 must agree within {onnx['tolerance_max_rel']:.0e} (relative) and its sampler's final sample "
        f"within {onnx['tolerance_sampling_rel_l2']:.0e} (relative L2), or the export fails.",
    ]
    if onnx["int8"]:
        lines += [
            f"INT8 (onnxruntime dynamic quantisation of the weights) is {onnx['int8']['size_ratio']:.2f}x the "
            "fp32 file; its error above is what the quantisation costs, reported, not gated."
        ]
    return "\n".join(lines) + "\n"

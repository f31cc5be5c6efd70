"""`sfumato bench export`: one denoiser step in PyTorch eager, ONNX fp32 and ONNX INT8, in one run.

The model is a registered denoiser (default unet-s, class-conditional, 10 classes) at
`--resolution`, randomly initialised with a fixed seed: latency does not depend on the weights'
values. Each runtime gets warm-up calls, then `--repeats` timed calls on the same fixed inputs, after
the machine has gone quiet; the figures are the median latency and images/s at batch 1 and 8. PyTorch runs under
`inference_mode` with its default threads, onnxruntime with its default session options
(graph optimisations on, one intra-op thread per core): what a user of either gets.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sfumato.bench import add_out_argument, publish
from sfumato.bench.ingest import machine, wait_for_quiet_cpu

BATCHES = (1, 8)


def _median_s(call, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call. Runtimes are timed one after the other, not interleaved:
    onnxruntime's idle threads spin for a while after a run and would slow a torch call
    that follows at once."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="unet-s", help="a registered model")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    parser.add_argument("--repeats", type=int, default=20, help="timed denoiser calls per setting")
    add_out_argument(parser)


def run(args) -> dict:
    import onnxruntime as ort

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.pipeline import SfumatoPipeline
    from sfumato.diffusion.sample import make_sampler
    from sfumato.export.onnx_export import _Denoiser, _export, example_inputs, quantize_int8
    from sfumato.models.registry import build_denoiser, parameter_count

    torch.manual_seed(0)
    denoiser = build_denoiser(args.model, args.resolution, 3, 10).eval()
    pipe = SfumatoPipeline(unet=denoiser.net, scheduler=make_sampler(DiffusionConfig(), "ddim"))
    module = _Denoiser(pipe.unet, None).eval()
    result = {
        "machine": machine(),
        "model": args.model,
        "parameters": parameter_count(denoiser),
        "resolution_px": args.resolution,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "settings": {},
    }
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-export-") as tmp:
        fp32, int8 = Path(tmp) / "denoiser.onnx", Path(tmp) / "denoiser.int8.onnx"
        _export(module, example_inputs(pipe, 2, 0), fp32, "prediction", 18)
        quantize_int8(fp32, int8)
        sessions = {
            name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8))
        }
        for batch in BATCHES:
            inputs = example_inputs(pipe, batch, 1)
            feed = {k: v.numpy() for k, v in inputs.items()}
            with torch.inference_mode():
                reference = module(**inputs).numpy()
                wait_for_quiet_cpu()
                seconds = {"torch_eager": _median_s(lambda inputs=inputs: module(**inputs), args.repeats)}
            for name, session in sessions.items():
                seconds[name] = _median_s(lambda session=session, feed=feed: session.run(None, feed), args.repeats)
            for name, session in sessions.items():
                error = np.abs(session.run(None, feed)[0] - reference).max() / np.abs(reference).max()
                result["settings"][f"{name}_b{batch}_max_rel_error"] = float(error)
            for name, s in seconds.items():
                result["settings"][f"{name}_b{batch}"] = {
                    "latency_ms": round(s * 1000, 2),
                    "images_per_s": round(batch / s, 1),
                    "speedup_vs_torch": round(seconds["torch_eager"] / s, 2),
                }
    return publish(result, report(result), args.out)


def report(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['nproc']} CPUs, {m['memory_gb']} GiB; torch {r['torch']} "
        f"({r['torch_threads']} threads), onnxruntime {r['onnxruntime']}",
        f"model: {r['model']} ({r['parameters']:,} parameters) at {r['resolution_px']} px, "
        f"median of {r['repeats']} calls",
        "",
        f"{'runtime':12} {'batch':>5} {'latency ms':>11} {'images/s':>9} {'vs torch':>9} {'max rel err':>12}",
    ]
    for batch in BATCHES:
        for name in ("torch_eager", "onnx_fp32", "onnx_int8"):
            s = r["settings"][f"{name}_b{batch}"]
            err = r["settings"].get(f"{name}_b{batch}_max_rel_error")
            lines.append(
                f"{name:12} {batch:>5} {s['latency_ms']:>11} {s['images_per_s']:>9} {s['speedup_vs_torch']:>9} "
                f"{'' if err is None else f'{err:.1e}':>12}"
            )
    return "\n".join(lines)

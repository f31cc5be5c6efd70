"""`sfumato bench serve`: closed-loop HTTP load on the Serve endpoint, batching on and off, torch and
onnx backends, at concurrency 1, 8 and 32, in one run.

The model is a registered denoiser (default unet-s at 32 px, class-conditional) with random
weights, exported the way `sfumato export` does (diffusers folder and ONNX). For each backend and
batching setting the app is started on 127.0.0.1; a separate process (`python -m
sfumato.bench.serve URL ...`) keeps `c` requests in flight for `--duration` seconds (each thread
sends its next request when the last one returns) and reports requests/s, p50/p99 latency and
errors. Every request asks for one image at `--steps` steps with its own seed and class; capacity
(max_ongoing_requests 32, max_queued_requests 64) is set so that no request has to be refused.

The output safety filter's price: torch with batching, at concurrency 1 and 32, once more with
`safety_model` set to a randomly initialised CLIP of ViT-B/32's shapes (the compute of the usual
safety model; flagged images blurred, so every answer is a 200), and the filter alone on a batch.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sfumato.bench import add_out_argument, publish
from sfumato.bench.ingest import machine

CONCURRENCY = (1, 8, 32)


def load(url: str, concurrency: int, duration_s: float, steps: int, classes: int) -> dict:
    """Closed loop: `concurrency` threads, each one request in flight, for duration_s."""
    import requests

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker(index: int) -> None:
        session = requests.Session()
        n = 0
        while time.perf_counter() < stop_at:
            body = {  # unguided, as the in-process rows: one model call a step, whatever the export's default
                "seed": index * 100_000 + n,
                "steps": steps,
                "class_label": (index + n) % classes,
                "guidance_scale": 1.0,
            }
            start = time.perf_counter()
            try:
                status = session.post(f"{url}/v1/generate", json=body, timeout=120).status_code
            except requests.RequestException as err:
                status = type(err).__name__
            with lock:
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            n += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = (
        (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1))
        if latencies
        else (lambda q: None)
    )
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "errors": errors,
        "mean_ms": round(statistics.mean(latencies) * 1000, 1) if latencies else None,
    }


def _export(folder: Path, model: str, resolution: int) -> Path:
    import torch

    from sfumato.config import DiffusionConfig
    from sfumato.diffusion.pipeline import SfumatoPipeline
    from sfumato.diffusion.sample import make_sampler
    from sfumato.export.diffusers_folder import write_diffusers
    from sfumato.export.onnx_export import export_onnx
    from sfumato.models.registry import build_denoiser

    torch.manual_seed(0)
    net = build_denoiser(model, resolution, 3, 10).net.eval()
    pipe = SfumatoPipeline(
        unet=net, scheduler=make_sampler(DiffusionConfig(), "ddim"), class_names=[f"class{i}" for i in range(10)]
    )
    write_diffusers(pipe, folder / "diffusers", {"run": f"bench-{model}"})
    export_onnx(pipe, make_sampler(DiffusionConfig(), "ddim"), folder / "onnx", 18, 2, int8=False)
    return folder


def model_ceiling(export: Path, backend: str, steps: int, repeats: int = 3) -> dict:
    """The backend alone, no HTTP: images/s for one job of 1 image vs 8 jobs in one loop. The
    ratio bounds what batching can gain for this model on this machine. torch runs with one
    thread, as in a replica with num_cpus 1 (Ray sets OMP_NUM_THREADS from it)."""
    import torch

    from sfumato.serve.backends import Job, load_backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_backend(export, backend)
        rates = {}
        for n in (1, 8):
            jobs = [
                Job(
                    id=str(i),
                    seed=i,
                    steps=steps,
                    guidance_scale=1.0,
                    num_images=1,
                    sampler="ddim",
                    width=0,
                    height=0,
                    class_label=i % 10,
                )
                for i in range(n)
            ]
            info = model.info()
            for job in jobs:
                job.width = job.height = info.default_size_px
            model.generate(jobs)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                model.generate(jobs)
            rates[n] = n * repeats / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        "images_per_s_batch_1": round(rates[1], 2),
        "images_per_s_batch_8": round(rates[8], 2),
        "batch_8_speedup": round(rates[8] / rates[1], 2),
    }


def filter_alone(clip: Path, resolution: int, repeats: int = 3) -> dict:
    """The output safety filter alone, one thread as in a replica: ms per image on a batch of 8."""
    import numpy as np
    import torch

    from sfumato.config import SafetyConfig
    from sfumato.serve.safety import OutputFilter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        defaults = SafetyConfig()
        flt = OutputFilter(str(clip), 0.5, "blur", defaults.unsafe_prompts, defaults.safe_prompts)
        images = [
            np.random.default_rng(i).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for i in range(8)
        ]
        flt(images)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            flt(images)
        ms = (time.perf_counter() - start) / (repeats * len(images)) * 1000
    finally:
        torch.set_num_threads(threads)
    return {"ms_per_image": round(ms, 1)}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="unet-s", help="a registered model, exported untrained")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per cell")
    parser.add_argument("--serve-steps", type=int, default=10, help="denoising steps per request")
    add_out_argument(parser)


def run(args) -> dict:
    from ray import serve

    from sfumato.serve.app import ServeSettings, run_server
    from sfumato.testing.tiny import save_clip_b32_shaped

    result = {
        "machine": machine(),
        "model": args.model,
        "resolution_px": args.resolution,
        "steps": args.serve_steps,
        "duration_s": args.duration,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-serve-") as tmp:
        export = _export(Path(tmp), args.model, args.resolution)
        result["model_alone"] = {
            backend: model_ceiling(export, backend, args.serve_steps) for backend in ("torch", "onnx")
        }
        clip = Path(tmp) / "clip-b32-shaped"
        save_clip_b32_shaped(clip)
        result["safety_filter_alone"] = filter_alone(clip, args.resolution)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cells = [(backend, batch, None, CONCURRENCY) for backend in ("torch", "onnx") for batch in (8, 1)]
        cells.append(("torch", 8, clip, (1, max(CONCURRENCY))))
        for backend, batch, safety, concurrencies in cells:
            settings = ServeSettings(
                model=str(export),
                backend=backend,
                max_batch_size=batch,
                max_steps=1000,
                max_ongoing_requests=32,
                max_queued_requests=64,
                request_timeout_s=120,
                safety_model=None if safety is None else str(safety),
                safety_action="blur",
            )
            run_server(settings, port=port, blocking=False)
            url = f"http://127.0.0.1:{port}"
            for concurrency in concurrencies:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "sfumato.bench.serve",
                        url,
                        str(concurrency),
                        str(args.duration),
                        str(args.serve_steps),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                result["runs"].append(
                    {"backend": backend, "max_batch_size": batch, "safety": safety is not None, **figures}
                )
                print(json.dumps(result["runs"][-1]), flush=True)
            serve.delete("sfumato")
        serve.shutdown()
    return publish(result, report(result), args.out)


def report(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['nproc']} CPUs, {m['memory_gb']} GiB",
        f"model: {r['model']} at {r['resolution_px']} px, {r['steps']} steps per image, {r['duration_s']} s per cell",
        "",
        f"{'backend':8} {'batch':>5} {'safety':>6} {'conc.':>5} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8}",
    ]
    for run in r["runs"]:
        lines.append(
            f"{run['backend']:8} {run['max_batch_size']:>5} {'on' if run['safety'] else 'off':>6} "
            f"{run['concurrency']:>5} {run['requests_per_s']:>7} "
            f"{run['p50_ms']!s:>8} {run['p99_ms']!s:>8} {sum(run['errors'].values()):>8}"
        )
    lines.append("")
    for backend, c in r["model_alone"].items():
        served = {
            run["max_batch_size"]: run["requests_per_s"]
            for run in r["runs"]
            if run["backend"] == backend and run["concurrency"] == max(CONCURRENCY) and not run["safety"]
        }
        lines.append(
            f"{backend}: batching on/off at concurrency {max(CONCURRENCY)}: "
            f"{served[8] / served[1]:.2f}x; the model alone, 8 images in one loop vs 1: {c['batch_8_speedup']}x "
            f"({c['images_per_s_batch_1']} -> {c['images_per_s_batch_8']} images/s)"
        )
    cost = {
        (run["safety"], run["concurrency"]): run["requests_per_s"]
        for run in r["runs"]
        if run["backend"] == "torch" and run["max_batch_size"] == 8
    }
    for concurrency in (1, max(CONCURRENCY)):
        lines.append(
            f"torch, batching, concurrency {concurrency}: the safety filter (ViT-B/32-shaped CLIP) takes "
            f"requests/s {cost[False, concurrency]} -> {cost[True, concurrency]} "
            f"({cost[True, concurrency] / cost[False, concurrency] - 1:+.0%})"
        )
    lines.append(f"the filter alone: {r['safety_filter_alone']['ms_per_image']} ms per image (batch of 8, one thread)")
    return "\n".join(lines)


if __name__ == "__main__":  # the load generator, in its own process
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("duration", type=float)
    parser.add_argument("steps", type=int)
    parser.add_argument("--classes", type=int, default=10)
    a = parser.parse_args()
    print(json.dumps(load(a.url, a.concurrency, a.duration, a.steps, a.classes)))

"""`sfumato bench ingest`: the project's Ray Data ingest + shards against a multiprocessing.Pool
loop doing the same per-image work with the same library functions and the same number of
processes, on real flower photos repeated to N images; then both again at memory_scale x N:
the throughput ratio there is the one that counts (start-up costs weigh less), and the Ray
path's peak memory there shows it does not grow with the data.

Every copy of a photo gets unique bytes after the JPEG end-of-image marker: decoders ignore
them, but no two inputs are exact duplicates, so ingest's sha256 collapse removes nothing and
both sides do the full work for every image. The Pool runs first, before Ray exists. Each Ray
run gets a fresh local Ray, started before its clock starts: start-up is not counted, the
creation of Ray Data's own actors is. The Pool's processes are forked before its clock starts, as
Ray's prestarted workers are; both clocks include listing the input folder. Peak memory is the
summed PSS of this process and all its descendants (a local Ray's GCS, raylet and workers are
all descendants; the bench checks it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import psutil

from sfumato.bench import add_datasets_argument, add_out_argument
from sfumato.config import Config
from sfumato.data.decode import EXTENSIONS, DecodeLimits, Rejected, decode_image, encode, render
from sfumato.data.shards import tar_add
from sfumato.layout import DataFolder

RESOLUTIONS_PX = [64, 128]
# 20 shards at 5,000 images: a shard is the unit of parallelism of the second pass on both
# sides, so a handful of large shards would leave a core idle at the tail.
SAMPLES_PER_SHARD = 250
SAMPLE_INTERVAL_S = 1.0


def make_inputs(photos: list[Path], count: int, dest: Path) -> Path:
    """`count` files under dest/<class>/, photo i % len(photos) plus unique trailing bytes."""
    for i in range(count):
        src = photos[i % len(photos)]
        (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
        (dest / src.parent.name / f"{i:07d}.jpg").write_bytes(src.read_bytes() + b"\0sfumato-copy-%d" % i)
    os.sync()  # write the files back now, not on the clock of the run that follows
    return dest


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


class Monitor:
    """While a run lasts, every SAMPLE_INTERVAL_S: the summed PSS (RSS where the OS has no PSS)
    of this process and its descendants, and each one's CPU time. PSS splits shared pages (Ray's
    object store, pages shared after fork) between their users, so the sum counts each page once.
    CPU is tracked per process because the raylet ignores SIGCHLD: a finished actor's CPU time
    never reaches its parent's. Machine-wide busy time minus the tree's is CPU that processes
    outside the bench took from it (it should be about 0)."""

    def __init__(self):
        self.peak_bytes, self.samples, self.cpu = 0, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me, total = psutil.Process(), 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    info, times = proc.memory_full_info(), proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between listing and reading
            total += getattr(info, "pss", info.rss)
            self.cpu[proc.pid] = times.user + times.system
        self.peak_bytes, self.samples = max(self.peak_bytes, total), self.samples + 1

    def _run(self):
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def __enter__(self):
        self._sample()
        self._start_cpu, self._start_busy = dict(self.cpu), _busy_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = sum(t - self._start_cpu.get(pid, 0.0) for pid, t in self.cpu.items())
        self.other_cpu_s = max(0.0, _busy_cpu_s() - self._start_busy - self.cpu_s)


def wait_for_quiet_cpu(limit_s: float = 60.0) -> float:
    """Wait (at most limit_s) until the machine is under 10% busy over half a second: a freshly
    started Ray boots its agents and prestarted workers after ray.init returns, and the kernel
    may still be writing back the inputs. Returns the seconds waited."""
    start = time.perf_counter()
    while psutil.cpu_percent(interval=0.5) > 10 and time.perf_counter() - start < limit_s:
        pass
    return round(time.perf_counter() - start, 1)


def _figures(images: int, phases: dict[str, float], mon: Monitor, waited_s: float) -> dict:
    seconds = sum(phases.values())
    return {
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "peak_memory_mb": round(mon.peak_bytes / 2**20),
        "memory_samples": mon.samples,
        "cpu_s": round(mon.cpu_s, 1),
        "other_processes_cpu_s": round(mon.other_cpu_s, 1),
        "waited_for_quiet_cpu_s": waited_s,
    }


# ---------------------------------------------------------------- the multiprocessing.Pool baseline
def _validate(limits: DecodeLimits, path: str) -> tuple[str, str] | None:
    """Ingest's per-file work: read, hash, validate-decode at thumbnail scale."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        decode_image(data, limits, draft_px=limits.min_side_px, convert=False)
    except Rejected:
        return None
    return path, sha


def _write_shard(limits: DecodeLimits, scfg, job: tuple[int, int, list[tuple[str, str, int]], str]) -> int:
    """Shards' per-shard work: decode once, render + encode per resolution, the same members
    under the same keys (the sample's position in the accepted list)."""
    index, first_key, samples, out = job
    tars = {res: tarfile.open(Path(out) / str(res) / f"shard-{index:06d}.tar", "w") for res in scfg.resolutions_px}
    for offset, (path, caption, cls) in enumerate(samples):
        image = decode_image(Path(path).read_bytes(), limits, draft_px=max(scfg.resolutions_px)).image
        key = f"{first_key + offset:09d}"
        for res, tar in tars.items():
            tar_add(
                tar,
                f"{key}.{EXTENSIONS[scfg.image_format]}",
                encode(render(image, res, scfg.resize_mode), scfg.image_format, scfg.jpeg_quality),
            )
            tar_add(tar, f"{key}.txt", caption.encode())
            tar_add(tar, f"{key}.json", json.dumps({"caption": caption, "class": cls, "resolution_px": res}).encode())
            tar_add(tar, f"{key}.cls", str(cls).encode())
    for tar in tars.values():
        tar.close()
    return len(samples)


def run_pool(cfg: Config, workers: int) -> dict:
    limits, scfg, out = DecodeLimits.from_config(cfg.data.ingest), cfg.data.shards, cfg.data.output_dir
    for res in scfg.resolutions_px:
        (out / str(res)).mkdir(parents=True, exist_ok=True)
    # Fork the workers before the sampler thread exists (forking a threaded process is unsafe).
    with Pool(workers) as pool:
        waited = wait_for_quiet_cpu()
        with Monitor() as mon:
            start = time.perf_counter()
            # Listing is the Ray path's work too (enumerate_sources): on the clock on both sides.
            paths = sorted(
                str(p) for p in cfg.data.sources[0].path.rglob("*") if p.is_file()
            )  # the folder source's order
            # Pass 1 in chunks of 32 files (~30 ms of work per message: IPC is negligible).
            first_copy = {}
            for path, sha in filter(None, pool.imap(functools.partial(_validate, limits), paths, chunksize=32)):
                first_copy.setdefault(sha, path)  # exact duplicates collapse onto the first copy, as in ingest
            classes = {c: i for i, c in enumerate(sorted({Path(p).parent.name for p in first_copy.values()}))}
            samples = [
                (p, f"a photo of a {Path(p).parent.name}", classes[Path(p).parent.name]) for p in first_copy.values()
            ]
            middle = time.perf_counter()
            # Pass 2: one task per shard, as the project's ShardWriter does.
            jobs = [
                (i, s, samples[s : s + SAMPLES_PER_SHARD], str(out))
                for i, s in enumerate(range(0, len(samples), SAMPLES_PER_SHARD))
            ]
            written = sum(pool.imap_unordered(functools.partial(_write_shard, limits, scfg), jobs))
            end = time.perf_counter()
    if written != len(paths):
        raise RuntimeError(f"the Pool baseline wrote {written} of {len(paths)} images")
    return _figures(written, {"validate": middle - start, "shards": end - middle}, mon, waited)


# ---------------------------------------------------------------- the project's Ray path
def bench_config(folder: Path, out: Path, workers: int) -> Config:
    """The local Ray gets `workers` CPUs; the stages take their defaults (a task per free CPU)."""
    return Config.model_validate(
        {
            "name": "bench-ingest",
            "ray": {"num_cpus": workers},
            "data": {
                "output_dir": str(out),
                "sources": [{"kind": "folder", "name": "flowers", "path": str(folder), "license": "CC-BY-2.0"}],
                "ingest": {"license_allowlist": ["CC-BY-2.0"], "min_side_px": 64},
                "shards": {
                    "resolutions_px": RESOLUTIONS_PX,
                    "image_format": "jpeg",
                    "samples_per_shard": SAMPLES_PER_SHARD,
                },
            },
        }
    )


def run_ray(cfg: Config, images: int) -> dict:
    import ray

    from sfumato.data.ingest import run_ingest
    from sfumato.data.shards import run_shards
    from sfumato.runtime import init_ray

    init_ray(cfg.ray)  # a fresh local Ray, before the clock: start-up is not ingest time
    try:
        waited = wait_for_quiet_cpu()
        with Monitor() as mon:
            start = time.perf_counter()
            ingested = run_ingest(cfg)
            middle = time.perf_counter()
            sharded = run_shards(cfg)
            end = time.perf_counter()
        # Anything of this Ray session outside our process tree would escape the memory figure.
        # Daemons carry the session folder in their command line; workers are the raylet's children.
        session = ray._private.worker._global_node.get_session_dir_path()
        tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        outside = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if p.pid not in tree and session in " ".join(p.info["cmdline"] or [])
        ]
    finally:
        ray.shutdown()
    if ingested.accepted != images or sharded.samples != images or sharded.failed:
        raise RuntimeError(f"Ray path: {ingested.line()}; {sharded.line()} (expected {images} images)")
    return {
        **_figures(images, {"ingest": middle - start, "shards": end - middle}, mon, waited),
        "ray_processes_outside_tree": len(outside),
    }


def same_images(a: Path, b: Path) -> bool:
    """True if both sides' shards hold byte-identical images under the same keys."""

    def images(root: Path) -> dict:
        found = {}
        for path in sorted(root.glob("*/shard-*.tar")):
            with tarfile.open(path) as tar:
                found.update(
                    {
                        f"{path.parent.name}/{m.name}": hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                        for m in tar
                        if m.name.endswith(".jpg")
                    }
                )
        return found

    return images(a) == images(b)


def machine() -> dict:
    import PIL
    import pyarrow
    import ray

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    return {
        "cpu": platform.processor() or model or platform.machine(),
        "uname": " ".join(platform.uname()),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "pillow": PIL.__version__,
        "pyarrow": pyarrow.__version__,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=5000, help="images at 1x data size")
    parser.add_argument("--memory-scale", type=int, default=10, help="also run at this multiple (0: skip)")
    parser.add_argument("--workers", type=int, default=2, help="processes on the Ray side and the Pool's")
    add_datasets_argument(parser, "flowers-val.tar")
    add_out_argument(parser)


def run(args) -> dict:
    bench_start = time.perf_counter()
    result = {
        "machine": machine(),
        "workers": args.workers,
        "images": args.images,
        "resolutions_px": RESOLUTIONS_PX,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "image_format": "jpeg",
    }
    with tempfile.TemporaryDirectory(prefix="sfumato-bench-ingest-") as tmp:
        tmp = Path(tmp)
        with tarfile.open(Path(args.datasets) / "flowers-val.tar") as tar:
            tar.extractall(tmp / "flowers", filter="data")
        photos = sorted((tmp / "flowers").rglob("*.jpg"))
        inputs = make_inputs(photos, args.images, tmp / "in-1x")
        result["pool"] = run_pool(bench_config(inputs, tmp / "pool-1x", args.workers), args.workers)
        result["ray"] = run_ray(bench_config(inputs, tmp / "ray-1x", args.workers), args.images)
        result["ray_over_pool"] = round(result["ray"]["images_per_s"] / result["pool"]["images_per_s"], 3)
        result["identical_images"] = same_images(tmp / "pool-1x", DataFolder(tmp / "ray-1x").shards)
        if args.memory_scale:
            for path in ("in-1x", "pool-1x", "ray-1x"):  # free the page cache for the large run
                shutil.rmtree(tmp / path)
            large = args.images * args.memory_scale
            inputs = make_inputs(photos, large, tmp / "in-large")
            result["pool_large"] = run_pool(bench_config(inputs, tmp / "pool-large", args.workers), args.workers)
            result["ray_large"] = run_ray(bench_config(inputs, tmp / "ray-large", args.workers), large)
            result["ray_over_pool_large"] = round(
                result["ray_large"]["images_per_s"] / result["pool_large"]["images_per_s"], 3
            )
            result["identical_images_large"] = same_images(tmp / "pool-large", DataFolder(tmp / "ray-large").shards)
            result["memory_large_over_1x"] = round(
                result["ray_large"]["peak_memory_mb"] / result["ray"]["peak_memory_mb"], 2
            )
    result["bench_seconds"] = round(time.perf_counter() - bench_start, 1)
    print(report(result, args.memory_scale))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"figures written to {args.out}")
    return result


def report(r: dict, scale: int) -> str:
    m = r["machine"]
    lines = [
        f"\ningest + shards of {r['images']} byte-distinct flower JPEGs, {r['workers']} worker processes, "
        f"shards at {r['resolutions_px']} px JPEG, {r['samples_per_shard']} samples per shard",
        f"machine: {m['cpu']}, {m['nproc']} CPUs, {m['memory_gb']} GiB; "
        f"Python {m['python']}, Ray {m['ray']}, Pillow {m['pillow']}",
        "Ray start-up is not timed (each Ray run starts its own Ray first); memory: peak summed PSS of",
        f"this process and all its descendants, sampled every {SAMPLE_INTERVAL_S} s\n",
        f"{'run':26}{'images':>7}{'pass 1 s':>9}{'pass 2 s':>9}{'total s':>8}"
        f"{'images/s':>9}{'peak MB':>8}{'other CPU s':>12}",
    ]
    runs = [("multiprocessing.Pool, 1x", "pool"), ("sfumato Ray Data, 1x", "ray")]
    if scale:
        runs += [(f"multiprocessing.Pool, {scale}x", "pool_large"), (f"sfumato Ray Data, {scale}x", "ray_large")]
    for name, key in runs:
        f = r[key]
        first, second = f["phases_s"].values()
        lines.append(
            f"{name:26}{f['images']:>7}{first:>9.1f}{second:>9.1f}{f['seconds']:>8.1f}{f['images_per_s']:>9.1f}"
            f"{f['peak_memory_mb']:>8}{f['other_processes_cpu_s']:>12.1f}"
        )
    lines.append(
        f"\nRay / Pool images/s at 1x: {r['ray_over_pool']:.2f}; both wrote identical images: {r['identical_images']}"
    )
    if scale:
        lines.append(
            f"Ray / Pool images/s at {scale}x: {r['ray_over_pool_large']:.2f} (target >= 1.0); "
            f"both wrote identical images: {r['identical_images_large']}"
        )
        lines.append(f"Ray peak memory {scale}x / 1x: {r['memory_large_over_1x']:.2f} (flat in data size: 1.0)")
    lines.append(
        "'other CPU s': CPU used meanwhile by processes outside the bench (should be ~0); "
        f"bench took {r['bench_seconds']:.0f} s"
    )
    return "\n".join(lines)

"""The console is quiet by default and whole with --verbose: third-party INFO lines, Ray Data's
execution-start blocks and the known-harmless warnings go; sfumato's lines, every other warning
and Ray Data's progress lines stay. In fresh processes (logging and warnings are per process)."""

import os
import subprocess
import sys

SCRIPT = """
import logging, warnings
from sfumato.console import configure_logging, quiet_ray_data
configure_logging()
logging.getLogger("onnxscript.rewriter").info("third-party info")
logging.getLogger("sfumato.data.ingest").info("sfumato info")
logging.getLogger("onnxscript.rewriter").warning("third-party warning")
logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed. Skipping nms")
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use TreeSpec", FutureWarning)
warnings.warn("a real deprecation", FutureWarning)
import ray.data
quiet_ray_data()
logging.getLogger("ray.data._internal.execution.streaming_executor").info("Starting execution of Dataset d_0")
logging.getLogger("ray.data._internal.progress.logging_progress").info("Total Progress: 3/8")
logging.getLogger("ray.data._internal.execution.streaming_executor").warning("a ray data warning")
print("print_on_execution_start", ray.data.DataContext.get_current().print_on_execution_start)
"""
ALWAYS = ["sfumato info", "third-party warning", "a real deprecation", "Total Progress: 3/8", "a ray data warning"]
QUIET_ONLY = ["third-party info", "torchvision is not installed", "LeafSpec", "Starting execution of Dataset"]


def _console(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SFUMATO_VERBOSE"}
    if verbose:
        env["SFUMATO_VERBOSE"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_quiet_by_default_keeps_sfumato_real_warnings_and_progress():
    out = _console(verbose=False)
    assert all(line in out for line in ALWAYS), out
    assert not any(line in out for line in QUIET_ONLY), out
    assert "print_on_execution_start False" in out


def test_verbose_shows_everything():
    out = _console(verbose=True)
    assert all(line in out for line in ALWAYS + QUIET_ONLY), out
    assert "print_on_execution_start True" in out


# Lines Ray's workers write, as the driver gets them (Ray forwards each worker's stdout and stderr);
# printed through Ray's own function for them, the one a run's driver uses.
WORKER_SCRIPT = """
from ray._private.worker import print_to_stdstream
from sfumato.console import quiet_ray_workers
quiet_ray_workers()
for pid, is_err, actor, line in {lines!r}:
    print_to_stdstream({{"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": pid, "is_err": is_err,
                        "actor_name": actor, "lines": [line]}}, ignore_prefix=False)
"""
PREEMPTION_NOTICE = (
    "[2026-12-07 04:13:54,500 E 17325 17571] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'd477697dde8076c1d6dd58e701000000' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
    "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
    "details."
)
SHM_BUILT = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
HARMLESS_WORKER = [
    (17325, True, "TrainController", PREEMPTION_NOTICE),
    (17401, False, "RayTrainWorker", SHM_BUILT),
    (17402, False, "RayTrainWorker", SHM_BUILT),
]
REAL_WORKER = [
    (
        17325,
        True,
        "TrainController",
        "[2026-12-07 04:13:55,001 E 17325 17571] core_worker.cc:1107: The actor PreemptionWatcher died unexpectedly",
    ),
    (17401, True, "RayTrainWorker", "RuntimeError: Error building extension 'deepspeed_shm_comm_op'"),
    (17402, False, "RayTrainWorker", "step 10/10 [####################] 100% | loss 0.12"),
]


def _worker_console(verbose: bool, lines: list) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SFUMATO_VERBOSE", "RAY_DEDUP_LOGS")}
    env["RAY_COLOR_PREFIX"] = "0"
    if verbose:
        env["SFUMATO_VERBOSE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT.format(lines=lines)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_known_harmless_worker_lines_are_hidden_and_real_errors_shown():
    out = _worker_console(False, HARMLESS_WORKER + REAL_WORKER)
    assert "PreemptionWatcher' and ID" not in out and "built successfully" not in out, out
    for _pid, _is_err, actor, line in REAL_WORKER:
        assert f"({actor} pid=" in out and line in out, out
    verbose = _worker_console(True, HARMLESS_WORKER + REAL_WORKER)
    assert PREEMPTION_NOTICE in verbose and SHM_BUILT in verbose, verbose

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

"""The default install (the data platform) imports without torch; nothing imports torchvision."""

import pkgutil
import subprocess
import sys

import sfumato

# Modules of the train, eval and serve extras (torch, diffusers, onnx, Ray Serve); everything else
# is the default install.
NEEDS_TRAIN_EXTRA = ("sfumato.diffusion", "sfumato.train", "sfumato.models", "sfumato.bench.train",
                     "sfumato.evaluate", "sfumato.export", "sfumato.bench.export", "sfumato.serve",
                     "sfumato.bench.serve")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_data_platform_imports_without_torch():
    names = [m.name for m in pkgutil.walk_packages(sfumato.__path__, "sfumato.")
             if not m.name.startswith(NEEDS_TRAIN_EXTRA)]
    assert "sfumato.data.ingest" in names and "sfumato.cli" in names
    done = _run("import importlib, sys\n"
                f"for name in {names!r}: importlib.import_module(name)\n"
                "assert 'torch' not in sys.modules, 'the default install must not need torch'\n")
    assert done.returncode == 0, done.stderr[-2000:]


def test_nothing_imports_torchvision():
    names = [m.name for m in pkgutil.walk_packages(sfumato.__path__, "sfumato.")]
    done = _run("import importlib, sys\n"
                f"for name in {names!r}: importlib.import_module(name)\n"
                "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n")
    assert done.returncode == 0, done.stderr[-2000:]

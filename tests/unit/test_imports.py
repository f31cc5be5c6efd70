"""The default install (the data platform) imports without torch; nothing imports torchvision."""

import pkgutil
import subprocess
import sys

import sfumato

# Modules of the train, eval and serve extras (torch, diffusers, onnx, Ray Serve); everything else
# is the default install.
NEEDS_TRAIN_EXTRA = ("sfumato.diffusion", "sfumato.train", "sfumato.models", "sfumato.bench.train",
                     "sfumato.bench.quality",
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


# The layers, lowest first: a module may import its own layer and the ones below, never above
# (an arrow up is a circle waiting to happen, and drags a heavier install into a lighter one).
LAYERS = [
    ("sfumato.layout", "sfumato.documents", "sfumato.console", "sfumato.models.names"),  # leaves
    ("sfumato.config", "sfumato.checkpoint", "sfumato.runtime"),
    ("sfumato.data", "sfumato.diffusion"),
    ("sfumato.models",),
    ("sfumato.train", "sfumato.evaluate", "sfumato.export"),
    ("sfumato.tune", "sfumato.serve", "sfumato.abtest"),
    ("sfumato.stages", "sfumato.pipeline", "sfumato.bench", "sfumato.cli"),
]


def _import_graph() -> dict[str, set[str]]:
    """Every sfumato module -> the sfumato modules it imports, at the top or inside a function."""
    import ast
    from pathlib import Path

    root = Path(sfumato.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(("sfumato", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sfumato":
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "sfumato"}
        graph[name] = {m for m in found if m in modules and m != "sfumato"}
    return graph


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS in tests/unit/test_imports.py"
    return max(matches)[1]


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} -> {b}" for a, targets in _import_graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph, state, cycles = _import_graph(), {}, []

    def visit(module, stack):
        state[module], path = "open", stack + [module]
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path)
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)

"""The default install (the data platform) imports without torch; nothing imports torchvision;
imports follow the layers; benches and test support are consumers, never dependencies."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import sfumato

# Modules of the train, eval and serve extras (torch, diffusers, onnx, Ray Serve); everything else
# is the default install.
NEEDS_TRAIN_EXTRA = (
    "sfumato.diffusion",
    "sfumato.train",
    "sfumato.models",
    "sfumato.bench.train",
    "sfumato.bench.quality",
    "sfumato.bench.models",
    "sfumato.bench.cache",
    "sfumato.evaluate",
    "sfumato.export",
    "sfumato.bench.export",
    "sfumato.serve",
    "sfumato.bench.serve",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_data_platform_imports_without_torch():
    names = [
        m.name for m in pkgutil.walk_packages(sfumato.__path__, "sfumato.") if not m.name.startswith(NEEDS_TRAIN_EXTRA)
    ]
    assert "sfumato.data.ingest" in names and "sfumato.cli" in names
    done = _run(
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules, 'the default install must not need torch'\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_nothing_imports_torchvision():
    names = [m.name for m in pkgutil.walk_packages(sfumato.__path__, "sfumato.")]
    done = _run(
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    assert done.returncode == 0, done.stderr[-2000:]


# The layers, lowest first: a module may import its own layer and the ones below, never above
# (an arrow up is a circle waiting to happen, and drags a heavier install into a lighter one).
LAYERS = [
    (
        "sfumato.layout",
        "sfumato.documents",
        "sfumato.console",
        "sfumato.models.names",
        "sfumato.records",
        "sfumato.world",
    ),  # leaves
    ("sfumato.config", "sfumato.checkpoint", "sfumato.runtime"),
    ("sfumato.data", "sfumato.diffusion"),
    ("sfumato.models",),
    ("sfumato.train", "sfumato.evaluate", "sfumato.export"),
    ("sfumato.tune", "sfumato.serve", "sfumato.abtest", "sfumato.testing"),
    ("sfumato.stages", "sfumato.pipeline", "sfumato.bench", "sfumato.cli"),
]


def _modules() -> dict[str, Path]:
    root = Path(sfumato.__file__).parent
    return {
        ".".join(("sfumato", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in root.rglob("*.py")
    }


def _sfumato_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The sfumato modules a file imports, at the top or inside a function, or by name
    (importlib.import_module, pytest.importorskip)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sfumato":
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sfumato"}
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "importorskip", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).startswith("sfumato.")
        ):
            found.add(node.args[0].value)
    return {m for m in found if m != "sfumato"}


def _import_graph() -> dict[str, set[str]]:
    """Every sfumato module -> the sfumato modules it imports."""
    modules = _modules()
    return {name: {m for m in _sfumato_imports(path, modules) if m in modules} for name, path in modules.items()}


def _layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
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
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path)
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Who may import the benches and the test stand-ins (issue 33): benches measure the product and
# tests check it; neither is a dependency of the product, and tests never lean on a bench.
BENCH_RUNNERS = ("sfumato.bench", "sfumato.cli")  # the CLI's `sfumato bench` runs them
TEST_SUPPORT_USERS = ("sfumato.bench", "sfumato.testing")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_product_module_imports_a_bench_or_the_test_stand_ins():
    wrong = [
        f"{a} -> {b}"
        for a, targets in _import_graph().items()
        for b in sorted(targets)
        if (_under(b, ("sfumato.bench",)) and not _under(a, BENCH_RUNNERS))
        or (_under(b, ("sfumato.testing",)) and not _under(a, TEST_SUPPORT_USERS))
    ]
    assert not wrong, "product code importing sfumato.bench or sfumato.testing:\n" + "\n".join(wrong)


def test_no_test_imports_a_bench():
    """Tests take their tiny models and helpers from sfumato.testing or tests/. The one exception is
    a bench's own test, tests/unit/test_bench_<name>.py, which imports sfumato.bench.<name> alone."""
    modules, tests = _modules(), Path(__file__).resolve().parents[1]
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        own = f"sfumato.bench.{path.stem.removeprefix('test_bench_')}" if path.stem.startswith("test_bench_") else None
        wrong += [
            f"{path.relative_to(tests)} -> {m}"
            for m in sorted(_sfumato_imports(path, modules))
            if _under(m, ("sfumato.bench",)) and m != own
        ]
    assert len(list(tests.rglob("test_*.py"))) > 40, f"{tests}: the test files were not found"
    assert not wrong, "tests importing bench code (move what they need to sfumato.testing):\n" + "\n".join(wrong)

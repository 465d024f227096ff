"""The architecture's one-way layering: core <- adaptation <- cli / _qt; no Qt or napari below
the plugin layer; no import cycles. Checked on the import statements of every module, and by
importing the headless packages in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_uda"
GUI_ROOTS = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "pyqtgraph")


def imported_modules(path: Path, *, runtime_top_level: bool = False) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved).

    With ``runtime_top_level``, only the imports that run when the module is imported: at the
    top level (also inside top-level ``if``/``try``), not inside functions, not under
    ``if TYPE_CHECKING:``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = list(ast.walk(tree))
    if runtime_top_level:
        nodes = []
        for statement in tree.body:
            if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
                continue
            if isinstance(statement, (ast.If, ast.Try)):
                nodes.extend(ast.walk(statement))
            nodes.append(statement)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph(*, runtime_top_level: bool = False) -> dict[str, set[str]]:
    """Which package modules each package module imports."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imported_modules(path, runtime_top_level=runtime_top_level) if m in paths}
        - {name}
        for name, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others."""
    reach = {name: set(targets) for name, targets in graph.items()}
    changed = True
    while changed:  # transitive closure (the package has about a hundred modules)
        changed = False
        for name, targets in reach.items():
            extended = targets.union(*(reach[t] for t in targets))
            if extended != targets:
                reach[name], changed = extended, True
    groups = {
        frozenset({n, *(m for m in reach[n] if n in reach[m])}) for n in reach if n in reach[n]
    }
    return sorted(sorted(group) for group in groups)


@pytest.mark.parametrize("folder", ["core", "adaptation", "cli", "batch"])
def test_headless_packages_import_no_gui(folder):
    for path in modules_under(folder):
        gui = {m for m in imported_modules(path) if m.split(".")[0] in GUI_ROOTS}
        assert not gui, f"{path.relative_to(PACKAGE)} imports {sorted(gui)}"


def test_core_does_not_depend_on_adaptation_cli_or_the_plugin():
    for path in modules_under("core"):
        upward = {
            m
            for m in imported_modules(path)
            if m.startswith(
                ("napari_uda.adaptation", "napari_uda.batch", "napari_uda.cli", "napari_uda._qt")
            )
        }
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_adaptation_does_not_depend_on_cli_or_the_plugin():
    for path in modules_under("adaptation"):
        upward = {
            m
            for m in imported_modules(path)
            if m.startswith(("napari_uda.batch", "napari_uda.cli", "napari_uda._qt"))
        }
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_headless_import_loads_no_qt():
    code = (
        "import sys, napari_uda.core, napari_uda.adaptation.engine, napari_uda.cli;"
        "import napari_uda.adaptation.methods, napari_uda.adaptation.report;"
        "import napari_uda.corrected_slices;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_ROOTS!r});"
        "print(','.join(bad))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert output == "", f"headless import loaded {output}"


def test_no_module_imports_itself_back_at_import_time():
    assert cycles(import_graph(runtime_top_level=True)) == []


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("napari_uda.adaptation.guard", "napari_uda.adaptation.engine"),
        ("napari_uda.core.models.torchscript", "napari_uda.core.models.registry"),
        ("napari_uda.core.models.deepbet", "napari_uda.core.models.registry"),
        ("napari_uda.core.models.scripted", "napari_uda.core.models.registry"),
    ],
)
def test_the_guard_and_the_model_adapters_do_not_import_their_users(low, high):
    """The engine uses the guard and the registry opens the adapters (also lazily, inside
    functions); the other way round would be a cycle, even one hidden in a function or under
    TYPE_CHECKING. Shared names live in leaf modules (guard.GuardOptions, models.errors)."""
    graph = import_graph()
    assert high not in graph[low]

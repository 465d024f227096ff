"""The architecture's one-way layering: core <- adaptation <- cli / _qt; no Qt or napari below
the plugin layer. Checked on the import statements of every module, and by importing the headless
packages in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_uda"
GUI_ROOTS = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "pyqtgraph")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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

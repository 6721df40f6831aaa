"""The core's import arrows: each subpackage imports only the ones below it, nothing imports a plugin
package, and no two modules import each other (docs/architecture.md draws the picture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qadapt"

#: unit -> the units it may import (a unit is a top-level module or subpackage of qadapt).
BASE = {"errors", "version"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "version": set(),
    "protocols": {"errors"},
    "rounding": {"errors", "protocols"},
    "registry": BASE | {"protocols"},
    "config": BASE | {"protocols", "registry"},
    "merging": BASE | {"protocols"},
    "formats": BASE | {"protocols", "registry", "config"},
    "model": BASE | {"protocols", "rounding", "registry", "config", "merging"},
    "persist": BASE | {"protocols", "registry", "config", "merging", "model", "formats"},
    # exporting imports model only for model.calibration (see EXPORT_MODEL_IMPORTS)
    "exporting": BASE | {"protocols", "rounding", "registry", "config", "merging", "formats", "model"},
    "testing": BASE | {"protocols", "rounding", "registry", "config", "merging", "model", "formats", "persist"},
    "hf": BASE | {"protocols", "registry", "config", "merging", "model", "formats", "persist"},
    "cli": BASE
    | {"protocols", "rounding", "registry", "config", "merging", "model", "formats", "persist", "exporting", "hf"}
    | {"testing", "__init__"},
    "__init__": None,  # the package's face imports what it re-exports
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """``(line, imported qadapt module)`` for every import in ``path`` (``from qadapt import x`` names module x
    when it is one, else the package itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0].startswith("qadapt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0].startswith("qadapt"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or (
                    ROOT.parent / Path(*candidate.split("."))
                ).is_dir()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


def _violations(unit: str, path: Path) -> list[str]:
    """Every import in ``path`` (a module of ``unit``) that points up the layers or into a plugin package."""
    allowed = ALLOWED[unit]
    found = []
    for line, module in _imports(path, top_level_only=False):
        if module.split(".")[0] != "qadapt":
            found.append(f"{path}:{line}: the core imports plugin package {module}")
            continue
        target = _unit(module)
        if target != unit and allowed is not None and target not in allowed:
            found.append(f"{path}:{line}: qadapt.{unit} may not import {module} (allowed: {sorted(allowed)})")
    return found


#: The one module of qadapt.model the export may import: the calibration statistics, so a calibrated
#: export gathers them with the in-memory merge's own code (never the live-model layer or merge code).
EXPORT_MODEL_IMPORTS = {"qadapt.model.calibration"}


def test_the_export_imports_only_the_calibration_statistics_from_model() -> None:
    found = [
        f"{path}:{line}: {module}"
        for path in SOURCES
        if _unit(_module_name(path)) == "exporting"
        for line, module in _imports(path, top_level_only=False)
        if _unit(module) == "model" and module not in EXPORT_MODEL_IMPORTS
    ]
    assert found == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_points_down_the_layers(path: Path) -> None:
    unit = _unit(_module_name(path))
    assert unit in ALLOWED, f"{path}: qadapt.{unit} is a unit the layering table does not know; add it"
    assert _violations(unit, path) == []


def test_no_module_level_import_cycle() -> None:
    graph = {_module_name(p): {m for _, m in _imports(p, top_level_only=True)} for p in SOURCES}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycle = [*stack[stack.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            # A module importing its own package's __init__ runs it first: an edge like any other.
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_layering_test_sees_an_arrow_up_and_a_plugin_import(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "from qadapt.model.layer import QuantAdapterLinear\nimport qadapt_bnb\nfrom qadapt.errors import QAdaptError\n",
        encoding="utf-8",
    )
    found = _violations("merging", sample)
    assert len(found) == 2 and "may not import qadapt.model.layer" in found[0] and "qadapt_bnb" in found[1]


def test_no_subpackage_shadows_a_public_name():
    # A subpackage named like a public function (qadapt.export, qadapt.merge, qadapt.plugins) replaces the
    # function as an attribute of qadapt as soon as anything imports it.
    import importlib
    import types

    import qadapt

    for path in SOURCES:
        if path.name != "__main__.py":  # running it is the command line
            importlib.import_module(_module_name(path))
    shadowed = [name for name in qadapt.__all__ if isinstance(getattr(qadapt, name), types.ModuleType)]
    assert shadowed == []

"""Module boundaries, from the source's syntax trees: igpt_core never imports Prefect, only
the igpt_core/tracking/ package imports MLflow, and flows/ imports only igpt_core's public modules, Prefect and its own."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every import in the file, wherever it is (module level, functions, TYPE_CHECKING)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            # importlib.import_module("prefect") counts too, when the name is a literal
            roots.add(node.args[0].value.split(".")[0])
    return roots


def core_files() -> list[Path]:
    files = sorted((REPO / "igpt_core").rglob("*.py"))
    assert files, "igpt_core has no Python files"
    return files


def test_igpt_core_never_imports_prefect():
    offenders = [str(p.relative_to(REPO)) for p in core_files() if "prefect" in imported_roots(p)]
    assert offenders == []


def test_only_tracking_imports_mlflow():
    tracking = {str(p.relative_to(REPO)) for p in (REPO / "igpt_core" / "tracking").rglob("*.py")}
    assert "igpt_core/tracking/__init__.py" in tracking  # a package, not a lone module
    importers = {str(p.relative_to(REPO)) for p in core_files() if "mlflow" in imported_roots(p)}
    assert importers <= tracking
    assert importers, "no module of igpt_core/tracking/ imports mlflow"


def test_flows_do_not_import_mlflow_directly():
    """flows/ records through igpt_core.tracking, so the MLflow calls stay in one module."""
    offenders = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "flows").rglob("*.py"))
        if "mlflow" in imported_roots(p)
    ]
    assert offenders == []


def test_the_scanner_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "def f():\n"
        "    from prefect import flow\n"
        "    import mlflow.tracking\n"
        "    importlib.import_module('ray.train')\n"
        "from . import sibling\n"
    )
    assert imported_roots(sample) == {"os", "prefect", "mlflow", "ray"}

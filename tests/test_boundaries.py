"""Module boundaries, from the source's syntax trees: igpt_core never imports Prefect, only
the igpt_core/tracking/ package imports MLflow, and flows/ imports only igpt_core's public modules, Prefect and its own."""

from __future__ import annotations

import ast
import re
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


# --- where imports sit -------------------------------------------------------------------------------

HEAVY_ROOTS = frozenset(
    {
        "torch",
        "ray",
        "mlflow",
        "transformers",
        "pyarrow",
        "safetensors",
        "sklearn",
        "scipy",
        "prefect",
        "flows",
    }
)
"""Packages a function may import locally without a comment: each costs seconds to load, and `import igpt_core`,
`igpt --help` and `import igpt_core.loop/checkpoint` must not pay for them. The first five are the issue's list;
the rest, measured with `python -X importtime -c "import X"` (cumulative, on this 2-core build machine, 2026-12):
torch 3.0 s, ray 0.8 s (ray.train 2.2 s), mlflow 2.8 s, transformers 1.1 s, pyarrow 0.2 s (pyarrow.parquet 0.2 s),
safetensors.torch 2.0 s (it imports torch), sklearn 2.3 s (sklearn.linear_model 1.9 s), scipy.spatial 0.75 s,
prefect 2.2 s, flows.pipeline 3.0 s (flows/ imports Prefect at the top; only igpt_core/cli.py's flow commands call
it). For contrast, the light ones that belong at the top: tqdm.auto 0.10 s, PIL.Image 0.03 s, ninja 0.02 s."""

PROJECT_ROOTS = frozenset({"igpt_core", "flows"})
_REASON = re.compile(r"#\s*(?:heavy:\s*\S|cycle:\s*\S+\s*->\s*\S+)")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of igpt_core/ and flows/ (a package by its __init__.py)."""
    modules = {}
    for root in sorted(PROJECT_ROOTS):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> list[str]:
    """Absolute names an import statement loads (`from pkg import sub` names pkg.sub when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([base] if base else [])])
    subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    return subs or [base]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in a function body, not under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for stmt in statements:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found.append(stmt)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
                visit(stmt.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(stmt, field, [])
                    visit([c for c in children if isinstance(c, ast.stmt)])
                    for child in children:
                        if isinstance(child, (ast.ExceptHandler, ast.match_case)):
                            visit(child.body)

    visit(tree.body)
    return found


def function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside any function or method body (nested functions counted once)."""
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.setdefault(id(node), node)
    return sorted(found.values(), key=lambda node: node.lineno)


class ImportGraph:
    """The import statements of igpt_core/ and flows/, by module."""

    def __init__(self, modules: dict[str, Path]) -> None:
        self.modules = modules
        self.trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in modules.items()}

    def _targets(self, name: str, nodes: list[ast.Import | ast.ImportFrom]) -> set[str]:
        is_package = self.modules[name].name == "__init__.py"
        return {t for node in nodes for t in imported_modules(node, name, is_package, set(self.modules))}

    def top_level(self, name: str) -> set[str]:
        """Every module `name` imports when it is imported (project and third-party, module level only)."""
        return self._targets(name, module_level_imports(self.trees[name]))

    def anywhere(self, name: str) -> set[str]:
        return self._targets(
            name, [n for n in ast.walk(self.trees[name]) if isinstance(n, (ast.Import, ast.ImportFrom))]
        )

    def project_edges(self, name: str) -> set[str]:
        """The project modules `name` imports at module level (the package __init__ a submodule runs is not
        counted: Python imports a package before its submodules, so that is no cycle)."""
        return {t for t in self.top_level(name) if t in self.modules and t != name}

    def loads_heavy(self, name: str) -> bool:
        """Whether importing `name` imports a heavy root, following project modules and the packages above them."""
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for target in self.top_level(current):
                parts = target.split(".")
                if parts[0] in HEAVY_ROOTS - PROJECT_ROOTS:
                    return True
                todo.extend(
                    p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in self.modules
                )
        return False

    def depends_on(self, start: str, goal: str) -> bool:
        """Whether `start` imports `goal`, directly or through project modules, at any place in their files."""
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for target in self.anywhere(current):
                if target == goal:
                    return True
                if target in self.modules and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False


def local_import_offences(graph: ImportGraph, root: Path = REPO) -> list[str]:
    """`file:line name (why)` for every function-local import the rule does not allow."""
    offences = []
    for name, path in graph.modules.items():
        lines = path.read_text().splitlines()
        is_package = path.name == "__init__.py"
        for node in function_imports(graph.trees[name]):
            where = f"{path.relative_to(root)}:{node.lineno}"
            context = lines[node.lineno - 1 : node.end_lineno]
            if node.lineno > 1 and lines[node.lineno - 2].strip().startswith("#"):
                context.insert(0, lines[node.lineno - 2])  # a comment line right above counts too
            reason = _REASON.search("\n".join(context))
            for target in imported_modules(node, name, is_package, set(graph.modules)):
                top = target.split(".")[0]
                if top in HEAVY_ROOTS:
                    continue
                if top not in PROJECT_ROOTS:
                    offences.append(f"{where} {target} (a light import: move it to the top)")
                elif reason is None:
                    offences.append(
                        f"{where} {target} (say why it is local: `# heavy: <what>` or `# cycle: a -> b`)"
                    )
                elif "heavy" in reason.group() and not graph.loads_heavy(target):
                    offences.append(
                        f"{where} {target} (`# heavy:` but it imports nothing heavy at module level)"
                    )
                elif "cycle" in reason.group() and not graph.depends_on(target, name):
                    offences.append(f"{where} {target} (`# cycle:` but {target} does not import {name})")
    return offences


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_function_local_imports_are_heavy_or_break_a_cycle():
    """A function imports locally only a heavy optional dependency (HEAVY_ROOTS), or a project module whose line
    (or the line above) says why: `# heavy: <what>` (it imports torch & co. at module level, checked) or
    `# cycle: <a> -> <b>` (the imported module depends back on this one, checked). Everything else goes on top."""
    assert local_import_offences(ImportGraph(project_modules())) == []


def test_igpt_core_and_flows_have_no_module_level_import_cycle():
    """Module-level imports only (TYPE_CHECKING blocks and function bodies excluded): they run at import time."""
    graph = ImportGraph(project_modules())
    cycle = find_cycle({name: graph.project_edges(name) for name in graph.modules})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_import_checks_catch_what_they_should(tmp_path):
    files = {
        "igpt_core/__init__.py": "",
        "igpt_core/light.py": "import json\nfrom igpt_core import cyc\n",
        "igpt_core/big.py": "import torch\n",
        "igpt_core/cyc.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from igpt_core import big\n"
            "def f():\n"
            "    import torch\n"
            "    import json\n"
            "    from igpt_core import big  # heavy: torch\n"
            "    from igpt_core import light\n"
            "    # cycle: light -> cyc\n"
            "    from . import light as again\n"
            "    from igpt_core import light as bad  # heavy: says so, but is not\n"
            "def g():\n"
            "    from igpt_core.big import x  # cycle: big -> cyc (big imports no cyc)\n"
        ),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = ImportGraph(
        {f"igpt_core.{Path(rel).stem}".removesuffix(".__init__"): tmp_path / rel for rel in files}
    )
    assert local_import_offences(graph, tmp_path) == [
        "igpt_core/cyc.py:6 json (a light import: move it to the top)",
        "igpt_core/cyc.py:8 igpt_core.light (say why it is local: `# heavy: <what>` or `# cycle: a -> b`)",
        "igpt_core/cyc.py:11 igpt_core.light (`# heavy:` but it imports nothing heavy at module level)",
        "igpt_core/cyc.py:13 igpt_core.big (`# cycle:` but igpt_core.big does not import igpt_core.cyc)",
    ]
    assert graph.project_edges("igpt_core.cyc") == set()  # TYPE_CHECKING and function bodies do not count
    assert graph.loads_heavy("igpt_core.big") and not graph.loads_heavy("igpt_core.light")
    assert find_cycle({name: graph.project_edges(name) for name in graph.modules}) is None
    graph.trees["igpt_core.cyc"] = ast.parse("from igpt_core import light\n")
    edges = {name: graph.project_edges(name) for name in graph.modules}
    assert find_cycle(edges) == ["igpt_core.cyc", "igpt_core.light", "igpt_core.cyc"]

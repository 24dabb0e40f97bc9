"""Loads the scripts' Python helpers under infra/ (not a package: they run as plain scripts too)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

INFRA = Path(__file__).resolve().parents[1] / "infra"


def load_infra(name: str) -> ModuleType:
    """Imports infra/<name>.py as module `name` (registered in sys.modules, so pickling by name works)."""
    spec = importlib.util.spec_from_file_location(name, INFRA / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"infra/{name}.py not found"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

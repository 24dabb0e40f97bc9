"""Helpers shared by the end-to-end tests: the infra/ scripts' Python helpers (not a package: they run as
plain scripts too), and where a Ray Train run's registered checkpoints stand."""

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


def latest_registered_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for the run stored in `run_dir`, or None.

    Read through Ray Train's public `Result.from_path`; a folder already in storage but not yet registered
    does not count (a restarted run would not resume from it).
    """
    from ray.train import Result

    from igpt_core.checkpoint import CheckpointError, read_trainer_state

    try:
        checkpoint = Result.from_path(str(run_dir)).checkpoint
    except Exception:  # nothing registered yet, or Ray Train is rewriting its record of them
        return None
    if checkpoint is None:
        return None
    try:
        return int(read_trainer_state(checkpoint.path)["step"])
    except CheckpointError:  # pruned by Ray Train (num_to_keep) between reading its record and the folder
        return None

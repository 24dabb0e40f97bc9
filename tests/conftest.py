"""Shared fixtures. Tests that read ../shared skip when it is absent (a user's fresh clone has none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network here: keep every library from phoning home, before any of them is imported.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10"


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """../shared/data/cifar10 (webdataset tars of CIFAR-10 JPEGs); skips the test when absent."""
    if not (CIFAR / "train-000000.tar").exists():
        pytest.skip(f"{CIFAR} is absent (it is only present beside the project checkout)")
    return CIFAR


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 CPUs), started the way igpt starts one
    (`distributed.ensure_ray`: its API server, Ray Train's poll interval)."""
    import ray

    from igpt_core.distributed import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: the CI machine is shared, and two OpenMP threads fighting other
    processes run far slower than one. Modules of small CPU models use it for every test (pytestmark)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

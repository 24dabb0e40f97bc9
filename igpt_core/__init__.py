"""igpt: ImageGPT (generative pretraining from pixels) as a pipeline.

The Python API mirrors the `igpt` command line; names are imported on first use so that
`import igpt_core` stays cheap (no torch, Ray or MLflow at import time).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported now, not on first use: the function shares its name with its module, and importing the module
# `igpt_core.pretrain` later would otherwise bind that attribute to the module. The import is cheap (torch
# and Ray are imported inside its functions).
from igpt_core.pretrain import pretrain as pretrain

__version__ = "0.1.0"

_API = {
    "open_source": "igpt_core.sources",
    "fit_palette": "igpt_core.palette_fit",
    "Palette": "igpt_core.palette",
    "tokenize": "igpt_core.tokens",
    "read_shards": "igpt_core.data",
    "ImageGPT": "igpt_core.model",
    "pretrain": "igpt_core.pretrain",
    "sample_images": "igpt_core.sample",
    "complete_images": "igpt_core.sample",
    "run_probe": "igpt_core.probe",
    "preset": "igpt_core.config",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'igpt_core' has no attribute {name!r}")

"""igpt: ImageGPT (generative pretraining from pixels) as a pipeline.

The Python API mirrors the `igpt` command line; names are imported on first use so that
`import igpt_core` stays cheap (no torch, Ray or MLflow at import time).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "open_source": "igpt_core.sources",
    "fit_palette": "igpt_core.palette_fit",
    "Palette": "igpt_core.palette",
    "tokenize": "igpt_core.tokens",
    "read_shards": "igpt_core.data",
    "ImageGPT": "igpt_core.model",
    "pretrain": "igpt_core.pretrain",
    "finetune": "igpt_core.finetune",
    "FinetuneConfig": "igpt_core.finetune",
    "classify": "igpt_core.classify",
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


class _Package(types.ModuleType):
    """`igpt_core` itself. `pretrain` (like `finetune` and `classify`) names both a function of the API and the module that holds it: an
    `import igpt_core.pretrain` anywhere would bind the attribute to the module (the import system sets a
    submodule on its package), so this package keeps that one binding out and the name stays the function
    (`from igpt_core.pretrain import ...` reads sys.modules and is unaffected)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType) and value.__name__ == _API[name]:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

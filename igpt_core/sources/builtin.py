"""`builtin:NAME` sources: datasets bundled with an installed package, needing no download.

`builtin:digits` is scikit-learn's 8×8 digits (1797 real, labelled images), values 0..16 scaled to
0..255 (`round(v * 255 / 16)`) and repeated into RGB. A builtin is read as an array source.
"""

from __future__ import annotations

import numpy as np

from igpt_core.sources.base import SourceError

BUILTINS = ("digits",)


def load_builtin(spec: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(uint8 (N, H, W, 3) images, int64 (N,) labels, class names) of `builtin:NAME`."""
    name = spec.split(":", 1)[1]
    if name != "digits":
        raise SourceError(
            f"{spec}: unknown builtin source; choose one of builtin:{', builtin:'.join(BUILTINS)}"
        )
    from sklearn.datasets import load_digits  # heavy: scikit-learn, only for this builtin

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(images[:, :, :, None], 3, axis=3)
    return rgb, digits.target.astype(np.int64), tuple(str(c) for c in digits.target_names)

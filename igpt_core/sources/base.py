"""What every source kind shares: the records a read yields, the error, the size limits and the checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt_core.imaging import ImageRejected, decode_image

MAX_BYTES = 256 * 1024 * 1024
"""Files or tar members larger than this are rejected without being read into memory."""
ARRAY_CHUNK = 4096
"""Images per part of an array, npz or builtin source."""
CLASSES_FILE = "classes.txt"
"""Class names of a tar, parquet or npz source (one per line, label order), beside its files."""


class SourceError(ValueError):
    """A source is missing, unreadable, of an unknown kind, or holds no valid image; names the source."""


@dataclass(frozen=True, eq=False)
class Sample:
    key: str
    image: np.ndarray
    """uint8 (R, R, 3)."""
    label: int | None = None


@dataclass(frozen=True)
class Reject:
    key: str
    reason: str


def decoded(key: str, data: bytes, label: int | None, resolution: int, max_pixels: int) -> Sample | Reject:
    """Encoded image bytes as a Sample, or the Reject that `decode_image` gives its reason for."""
    try:
        return Sample(key, decode_image(data, resolution, max_pixels), label)
    except ImageRejected as e:
        return Reject(key, str(e))


def rows_rejected(name: str, start: int, stop: int, reason: str) -> Iterator[Reject]:
    """One reject per row of a part that cannot be read (`<name>:<row>`), so counts still add up."""
    for row in range(start, stop):
        yield Reject(f"{name}:{row}", reason)


def check_labels(spec: str, labels: np.ndarray | None, count: int) -> np.ndarray | None:
    """int64 labels of shape (count,), or None; raises SourceError for any other shape, dtype or sign."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise SourceError(f"{spec}: labels have shape {labels.shape}, expected ({count},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{spec}: labels must be integers, got dtype {labels.dtype}")
    if count and labels.min() < 0:
        raise SourceError(f"{spec}: labels must be non-negative, got {labels.min()}")
    return labels.astype(np.int64)


def read_class_names(path: Path) -> tuple[str, ...] | None:
    """The names in a `classes.txt` (one per line, label order; blank lines at the end ignored), or None
    when there is no such file. Raises SourceError naming the file for a blank or repeated name."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read class names: {e}") from None
    names = [line.strip() for line in text.rstrip().splitlines()]
    if not names or not all(names):
        blank = names.index("") + 1 if names else 1
        raise SourceError(f"{path}: line {blank} is blank; expected one class name per line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SourceError(f"{path}: class names must be unique, repeated: {', '.join(repeated)}")
    return tuple(names)


def check_images_shape(spec: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raises SourceError unless images are uint8 N×H×W (greyscale) or N×H×W×1|3|4, N, H, W > 0."""
    if dtype != np.uint8:
        raise SourceError(f"{spec}: images must be uint8, got dtype {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
        raise SourceError(f"{spec}: images must be N×H×W×3 (or N×H×W greyscale), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise SourceError(f"{spec}: no images (shape {shape})")

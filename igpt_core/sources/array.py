"""In-memory uint8 arrays N×H×W×3 or N×H×W (plus labels): key = `<index>`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from igpt_core.imaging import array_image
from igpt_core.sources.base import ARRAY_CHUNK, Reject, Sample, check_images_shape, check_labels


@dataclass(frozen=True)
class ArrayPart:
    """A slice of an in-memory array source; it carries its images (and labels) to the task."""

    source: str
    start: int
    """Index of the first image, so keys stay the source's indices."""
    stop: int
    images: np.ndarray = field(compare=False, repr=False)
    """uint8 (n, H, W[, 1|3|4])."""
    labels: np.ndarray | None = field(default=None, compare=False, repr=False)
    """int64 (n,)."""


def array_parts(images: np.ndarray, labels: np.ndarray | None, spec: str) -> list[ArrayPart]:
    """`images` cut into parts of ARRAY_CHUNK; raises SourceError for a bad shape, dtype or labels."""
    check_images_shape(spec, images.shape, images.dtype)
    checked = check_labels(spec, labels, len(images))
    return [
        ArrayPart(
            spec,
            start,
            min(start + ARRAY_CHUNK, len(images)),
            images=images[start : start + ARRAY_CHUNK],
            labels=None if checked is None else checked[start : start + ARRAY_CHUNK],
        )
        for start in range(0, len(images), ARRAY_CHUNK)
    ]


def read_array(part: ArrayPart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """Every image of the part as a Sample; arrays are never rejected (their shape was checked)."""
    for i, pixels in enumerate(part.images):
        label = None if part.labels is None else int(part.labels[i])
        yield Sample(str(part.start + i), array_image(pixels, resolution), label)

"""A folder of image files (`.jpg .jpeg .png .webp .bmp .gif .tif .tiff`, any case).

Top-level sub-folders are classes: label id = index of the sub-folder's name in the sorted list of
sub-folders holding images; images directly in the folder are unlabelled. Key = path relative to the
folder without its extension (the extension is kept when two files share a stem).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from igpt_core.sources.base import MAX_BYTES, Reject, Sample, decoded

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_CHUNK = 1000
"""Files per part of a folder source."""


@dataclass(frozen=True)
class FolderPart:
    """Files start..stop of a folder source, with their keys and the source's class names."""

    source: str
    root: str
    start: int
    stop: int
    names: tuple[str, ...]
    """The files' paths relative to `root` (posix)."""
    keys: tuple[str, ...]
    """The key of each file."""
    classes: tuple[str, ...]
    """A file's label is the index of its top-level sub-folder here."""


def folder_parts(
    spec: str, names: list[str], stems: list[str], root: Path
) -> tuple[list[FolderPart], tuple[str, ...]]:
    """(parts of FOLDER_CHUNK files, class names) of image files `names` (relative to `root`, sorted)."""
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    keys = [s if counts[s] == 1 else n for s, n in zip(stems, names, strict=True)]
    classes = tuple(sorted({n.split("/", 1)[0] for n in names if "/" in n}))
    parts = [
        FolderPart(
            spec,
            str(root),
            start,
            min(start + FOLDER_CHUNK, len(names)),
            names=tuple(names[start : start + FOLDER_CHUNK]),
            keys=tuple(keys[start : start + FOLDER_CHUNK]),
            classes=classes,
        )
        for start in range(0, len(names), FOLDER_CHUNK)
    ]
    return parts, classes


def read_folder(part: FolderPart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """Every file of the part, in order, decoded; an unreadable or oversized file is a Reject."""
    root = Path(part.root)
    class_ids = {name: i for i, name in enumerate(part.classes)}
    for name, key in zip(part.names, part.keys, strict=True):
        label = class_ids[name.split("/", 1)[0]] if "/" in name else None
        try:
            size = os.path.getsize(root / name)
            if size > MAX_BYTES:
                yield Reject(key, f"file is {size} bytes, over the limit of {MAX_BYTES}")
                continue
            data = (root / name).read_bytes()
        except OSError as e:
            yield Reject(key, f"cannot read file: {e}")
            continue
        yield decoded(key, data, label, resolution, max_pixels)

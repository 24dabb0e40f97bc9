"""`.npz` files holding `x` (uint8 N×H×W×3 or N×H×W) and optionally `y` (integer labels); no pickle.

Key = `<file stem>:<index>`. A part is a slice of one file's rows; it reads only those rows. Class names
come from a `classes.txt` beside the files (`base.read_class_names`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from igpt_core.imaging import array_image
from igpt_core.sources.base import (
    ARRAY_CHUNK,
    Reject,
    Sample,
    SourceError,
    check_images_shape,
    check_labels,
    rows_rejected,
)


@dataclass(frozen=True)
class NpzPart:
    """Rows start..stop of one .npz file."""

    source: str
    path: str
    name: str
    """The file's name relative to the source root without `.npz`: the keys' prefix."""
    start: int
    stop: int


def npz_parts(spec: str, files: list[Path], stems: list[str]) -> tuple[list[NpzPart], int]:
    """(parts of ARRAY_CHUNK rows, total rows); raises SourceError for a file that is not a valid npz."""
    parts = []
    total = 0
    for path, stem in zip(files, stems, strict=True):
        try:
            with zipfile.ZipFile(path) as zf:
                if "x.npy" not in zf.namelist():
                    raise SourceError(f"{path}: no array 'x' (found {zf.namelist()})")
                shape, dtype, fortran, _ = _npy_header(zf, "x.npy")
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"{path}: not a readable .npz file: {e}") from None
        check_images_shape(str(path), shape, dtype)
        if fortran:
            raise SourceError(f"{path}: 'x' is Fortran-ordered; save np.ascontiguousarray(x)")
        with np.load(path, allow_pickle=False) as npz:
            if "y" in npz.files:
                check_labels(str(path), npz["y"], shape[0])
        for start in range(0, shape[0], ARRAY_CHUNK):
            parts.append(NpzPart(spec, str(path), stem, start, min(start + ARRAY_CHUNK, shape[0])))
        total += shape[0]
    return parts, total


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, Fortran order, offset of the data) of an .npy member, read from its header only."""
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        return shape, dtype, fortran, fh.tell()


def read_npz(part: NpzPart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """The part's rows as Samples; every row a Reject when the file changed or broke since opening."""
    path = Path(part.path)
    try:
        with zipfile.ZipFile(path) as zf:
            shape, dtype, _, offset = _npy_header(zf, "x.npy")
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            # Seek inside the member instead of np.load: a part reads only its rows, not the whole array.
            with zf.open("x.npy") as fh:
                fh.seek(offset + part.start * row_bytes)
                raw = fh.read((part.stop - part.start) * row_bytes)
        images = np.frombuffer(raw, dtype=dtype).reshape((part.stop - part.start, *shape[1:]))
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["y"][part.start : part.stop] if "y" in npz.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # changed or damaged since opening
        reason = f"cannot read rows from {path}: {type(e).__name__}: {e}"
        yield from rows_rejected(part.name, part.start, part.stop, reason)
        return
    for i, pixels in enumerate(images):
        label = None if labels is None else int(labels[i])
        yield Sample(f"{part.name}:{part.start + i}", array_image(pixels, resolution), label)

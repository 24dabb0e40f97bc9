"""Opening a spec as a `Source` of typed parts, reading a part by its kind's reader, and the digest."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from igpt_core.imaging import MAX_PIXELS
from igpt_core.sources.array import ArrayPart, array_parts, read_array
from igpt_core.sources.base import CLASSES_FILE, Reject, Sample, SourceError, read_class_names
from igpt_core.sources.builtin import load_builtin
from igpt_core.sources.folder import IMAGE_EXTS, FolderPart, folder_parts, read_folder
from igpt_core.sources.npz import NpzPart, npz_parts, read_npz
from igpt_core.sources.parquet import ParquetPart, parquet_parts, read_parquet
from igpt_core.sources.tar import TAR_EXTS, TarPart, read_tar

SourcePart = FolderPart | TarPart | ParquetPart | NpzPart | ArrayPart
"""One independent unit of work (a slice of files, a tar, a parquet row group, a slice of rows or images).

Frozen, picklable and small, so Ray tasks can take it; an array part carries its slice of images."""


class Source:
    """An opened source: its parts in a fixed order, its class names and a content digest."""

    def __init__(
        self,
        spec: str,
        kind: str,
        parts: Sequence[SourcePart],
        *,
        files: list[tuple[str, Path]] | None = None,
        classes: tuple[str, ...] | None = None,
        size: int | None = None,
    ) -> None:
        self.spec = spec
        self.kind = kind
        """folder, tar, parquet, npz, array or builtin."""
        self.classes = classes
        """Class names by label id, when the source names them: folders (their sub-folders), builtin,
        parquet ClassLabel, and tars, parquet or npz with a classes.txt beside them."""
        self.size = size
        """Inputs known before reading (files, rows, images); None for tars."""
        self._parts = list(parts)
        self._files = files
        self._digest: str | None = None

    def parts(self) -> list[SourcePart]:
        return list(self._parts)

    def digest(self) -> str:
        """sha256 hex over the input content: file names relative to the root and their bytes, or the
        array bytes, shape and labels. Computed once, stable across runs, machines and folder moves."""
        if self._digest is None:
            h = hashlib.sha256(f"igpt-source-v1:{self.kind}\n".encode())
            if self._files is not None:
                for name, path in self._files:
                    with open(path, "rb") as fh:
                        file_hash = hashlib.file_digest(fh, "sha256").hexdigest()
                    h.update(f"{name}\0{file_hash}\n".encode())
            else:
                for part in self._parts:
                    assert isinstance(part, ArrayPart)
                    h.update(f"{part.images.shape}\n".encode())
                    h.update(np.ascontiguousarray(part.images).data)
                    if part.labels is not None:
                        h.update(np.ascontiguousarray(part.labels, dtype="<i8").data)
            self._digest = h.hexdigest()
        return self._digest

    def __repr__(self) -> str:
        return f"Source({self.spec!r}, kind={self.kind}, parts={len(self._parts)}, size={self.size})"


# ---------------------------------------------------------------------------------------------- opening


def open_source(
    spec: str | os.PathLike[str] | np.ndarray | Source, labels: np.ndarray | None = None
) -> Source:
    """Opens a spec (path, folder, glob, `builtin:NAME`, uint8 array) without decoding any image.

    Raises SourceError naming the spec when it is missing, of an unknown kind, or malformed.
    """
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, np.ndarray):
        name = f"<array {spec.dtype} {tuple(spec.shape)}>"
        return Source(name, "array", array_parts(spec, labels, name), size=len(spec))
    if labels is not None:
        raise SourceError(f"{spec}: labels= is only for in-memory arrays; files carry their own labels")
    text = os.fspath(spec)
    if text.startswith("builtin:"):
        images, targets, classes = load_builtin(text)
        parts = array_parts(images, targets, text)
        return Source(text, "builtin", parts, classes=classes, size=len(images))
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(text, path)
    if path.is_file():
        return _files_source(text, [path], path.parent)
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise SourceError(f"{text}: no files match this pattern")
        root = Path(os.path.commonpath([m.parent for m in matches]))
        return _files_source(text, matches, root)
    raise SourceError(f"{text}: no such file or directory")


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TAR_EXTS):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(IMAGE_EXTS):
        return "image"
    return None


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under root, sorted by relative path (the same order on every machine)."""
    found: list[Path] = []
    visited: set[str] = set()
    for here, dirs, files in os.walk(root, followlinks=True):
        # Linked folders are followed (datasets are often assembled from links), each real folder once.
        real = os.path.realpath(here)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(here, f) for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _folder_source(spec: str, root: Path) -> Source:
    files = [p for p in _walk(root) if _kind_of(p) is not None]
    if not files:
        raise SourceError(f"{spec}: the folder holds no images, tars, parquet or npz files")
    return _files_source(spec, files, root)


def _files_source(spec: str, files: list[Path], root: Path) -> Source:
    """Files of one kind (images, tars, parquet or npz) under `root`; SourceError for none or a mix."""
    kinds = sorted({_kind_of(p) or "unsupported" for p in files})
    if kinds == ["unsupported"] or len(kinds) > 1:
        found = ", ".join(f"{k}: {sum((_kind_of(p) or 'unsupported') == k for p in files)}" for k in kinds)
        raise SourceError(
            f"{spec}: expected images, tars (.tar/.tar.gz), parquet or npz files of one kind; found {found}"
        )
    kind = kinds[0]
    names = [p.relative_to(root).as_posix() for p in files]
    digest_files = list(zip(names, files, strict=True))
    stems = [_strip_ext(n) for n in names]
    if kind == "image":
        folder, classes = folder_parts(spec, names, stems, root)
        return Source(spec, "folder", folder, files=digest_files, classes=classes or None, size=len(files))
    if kind == "tar":
        tars = [TarPart(spec, str(p), n) for n, p in digest_files]
        named, listed = _classes_file(root, digest_files)
        return Source(spec, "tar", tars, files=listed, classes=named)
    if kind == "npz":
        npz, rows = npz_parts(spec, files, stems)
        named, listed = _classes_file(root, digest_files)
        return Source(spec, "npz", npz, files=listed, classes=named, size=rows)
    groups, parquet_classes, rows = parquet_parts(spec, files, stems)
    if parquet_classes is not None:  # the file's own ClassLabel names come first
        return Source(spec, "parquet", groups, files=digest_files, classes=parquet_classes, size=rows)
    named, listed = _classes_file(root, digest_files)
    return Source(spec, "parquet", groups, files=listed, classes=named, size=rows)


def _classes_file(
    root: Path, files: list[tuple[str, Path]]
) -> tuple[tuple[str, ...] | None, list[tuple[str, Path]]]:
    """(the names in `root`/classes.txt or None, `files` plus that file when there is one): the names
    are part of what the data means, so they are part of its digest."""
    path = root / CLASSES_FILE
    classes = read_class_names(path)
    if classes is None:
        return None, files
    return classes, [*files, (CLASSES_FILE, path)]


def _strip_ext(name: str) -> str:
    lower = name.lower()
    for ext in (*TAR_EXTS, ".parquet", ".npz", *IMAGE_EXTS):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


# ---------------------------------------------------------------------------------------------- reading


def read_part(
    part: SourcePart, resolution: int, *, max_pixels: int = MAX_PIXELS
) -> Iterator[Sample | Reject]:
    """Every input of one part, in order, as a Sample (uint8 (R, R, 3)) or a Reject with its reason."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: must be a positive integer, got {resolution!r}")
    match part:
        case FolderPart():
            return read_folder(part, resolution, max_pixels)
        case TarPart():
            return read_tar(part, resolution, max_pixels)
        case ParquetPart():
            return read_parquet(part, resolution, max_pixels)
        case NpzPart():
            return read_npz(part, resolution, max_pixels)
        case ArrayPart():
            return read_array(part, resolution, max_pixels)
    raise ValueError(f"{getattr(part, 'source', part)!r}: not a source part ({type(part).__name__})")


def iter_source(
    source: Source, resolution: int, *, max_pixels: int = MAX_PIXELS
) -> Iterator[Sample | Reject]:
    """All parts in order. Raises SourceError at the end when not one input became a Sample."""
    produced = rejected = 0
    reasons: list[str] = []
    for part in source.parts():
        for item in read_part(part, resolution, max_pixels=max_pixels):
            if isinstance(item, Sample):
                produced += 1
            else:
                rejected += 1
                if len(reasons) < 3:
                    reasons.append(f"{item.key}: {item.reason}")
            yield item
    if produced == 0:
        detail = "; ".join(reasons) if reasons else "it is empty"
        raise SourceError(f"{source.spec}: no valid image ({rejected} rejected: {detail})")

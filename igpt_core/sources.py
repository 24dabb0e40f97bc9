"""Image sources: every input a user has, read as (key, uint8 RGB R×R image, label | None) or a reject.

Specs `open_source` understands:

- a folder of images (`.jpg .jpeg .png .webp .bmp .gif .tif .tiff`, any case). Top-level sub-folders are
  classes: label id = index of the sub-folder's name in the sorted list of sub-folders holding images
  (`Source.classes`); images directly in the folder are unlabelled. Key = path relative to the folder
  without its extension (the extension is kept when two files share a stem). Hidden files and files of
  other types (README, CSV) are ignored.
- webdataset tars (`x.tar`, a folder of tars, or a glob like `data/train-*.tar`; `.tar.gz`/`.tgz` too):
  members group by key as webdataset does (`dir/key.ext`); a sample needs one `.jpg/.jpeg/.png/.webp`
  member and may have a `.cls` (ASCII integer label). Tars are read as streams, never extracted.
  Key = the webdataset key; as in webdataset, keys are assumed unique across the tars of one source
  (a key repeated inside one tar is rejected). A tar that breaks off (truncated or garbled) keeps the
  samples before the break; the sample being read at the break is rejected with the reason.
- parquet files in the Hugging Face `image` layout (a `{bytes, path}` struct column named `image` or
  `img`, else the first such struct; a label column `label`, `labels`, `fine_label` or `coarse_label`;
  ClassLabel names in the schema metadata become `Source.classes`). Key = `<file stem>:<row>`.
- `.npz` files holding `x` (uint8 N×H×W×3 or N×H×W) and optionally `y` (integer labels); no pickle.
  Key = `<file stem>:<index>`.
- an in-memory uint8 array N×H×W×3 or N×H×W (plus `labels=`), key = `<index>`.
- `builtin:digits`: scikit-learn's bundled 8×8 digits (1797 real, labelled images, no download), values
  0..16 scaled to 0..255 (`round(v * 255 / 16)`) and repeated into RGB.

Every image comes out as a C-contiguous uint8 (R, R, 3) array, decoded and resized by
`igpt_core.imaging` (`decode_image` for encoded bytes, `array_image` for arrays); its docstring holds
the pixel rules (header size limit, 16-bit scaling, CMYK, alpha over white, EXIF orientation, centre
crop and BICUBIC resize, JPEG draft mode). Its public names are re-exported here.

Bad input never stops a read: each input comes out either as a `Sample` or as a `Reject(key, reason)`.
A source with no valid image at all raises `SourceError` (from `iter_source`), as does a missing path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igpt_core.imaging import MAX_PIXELS, ImageRejected, array_image, decode_image

__all__ = [
    "ARRAY_CHUNK",
    "BUILTINS",
    "FOLDER_CHUNK",
    "IMAGE_EXTS",
    "LABEL_COLUMNS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "TAR_EXTS",
    "TAR_IMAGE_EXTS",
    "ImageRejected",
    "Reject",
    "RejectReport",
    "Sample",
    "Source",
    "SourceError",
    "SourcePart",
    "array_image",
    "decode_image",
    "iter_source",
    "open_source",
    "read_part",
    "summarize",
]

MAX_BYTES = 256 * 1024 * 1024
"""Files or tar members larger than this are rejected without being read into memory."""
FOLDER_CHUNK = 1000
"""Files per part of a folder source."""
ARRAY_CHUNK = 4096
"""Images per part of an array, npz or builtin source."""

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
BUILTINS = ("digits",)
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")


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


@dataclass(frozen=True)
class SourcePart:
    """One independent unit of work (a tar, a parquet row group, a slice of files or images).

    Picklable and small, so Ray tasks can take it; an array part carries its slice of images.
    """

    source: str
    kind: str
    """folder, tar, parquet, npz or array."""
    path: str | None
    start: int
    """First file / row / image index covered (0 for a tar)."""
    stop: int | None
    """One past the last index covered (None for a tar: read to its end)."""
    name: str = ""
    """The file's name relative to the source root, used in keys and rejects."""
    items: tuple[str, ...] = ()
    """folder: the chunk's file paths relative to `path`; parquet: (image column, label column or '')."""
    keys: tuple[str, ...] = ()
    """folder: the key of each item."""
    classes: tuple[str, ...] = ()
    """folder: class names; an item's label is the index of its top-level sub-folder here."""
    images: np.ndarray | None = field(default=None, compare=False, repr=False)
    labels: np.ndarray | None = field(default=None, compare=False, repr=False)


class Source:
    """An opened source: its parts in a fixed order, its class names and a content digest."""

    def __init__(
        self,
        spec: str,
        kind: str,
        parts: list[SourcePart],
        *,
        files: list[tuple[str, Path]] | None = None,
        classes: tuple[str, ...] | None = None,
        size: int | None = None,
    ) -> None:
        self.spec = spec
        self.kind = kind
        self.classes = classes
        """Class names by label id, when the source names them (folders, parquet ClassLabel)."""
        self.size = size
        """Inputs known before reading (files, rows, images); None for tars."""
        self._parts = parts
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
                    assert part.images is not None
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
        return _array_source(spec, labels, f"<array {spec.dtype} {tuple(spec.shape)}>", "array")
    if labels is not None:
        raise SourceError(f"{spec}: labels= is only for in-memory arrays; files carry their own labels")
    text = os.fspath(spec)
    if text.startswith("builtin:"):
        return _builtin_source(text)
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
    kinds = sorted({_kind_of(p) or "unsupported" for p in files})
    if kinds == ["unsupported"] or len(kinds) > 1:
        found = ", ".join(f"{k}: {sum((_kind_of(p) or 'unsupported') == k for p in files)}" for k in kinds)
        raise SourceError(
            f"{spec}: expected images, tars (.tar/.tar.gz), parquet or npz files of one kind; found {found}"
        )
    kind = kinds[0]
    names = [p.relative_to(root).as_posix() for p in files]
    if kind == "image":
        return _image_files_source(spec, files, names, root)
    digest_files = list(zip(names, files, strict=True))
    if kind == "tar":
        parts = [SourcePart(spec, "tar", str(p), 0, None, name=n) for n, p in digest_files]
        return Source(spec, "tar", parts, files=digest_files)
    stems = [_strip_ext(n) for n in names]
    if kind == "npz":
        return _npz_source(spec, files, stems, digest_files)
    return _parquet_source(spec, files, stems, digest_files)


def _strip_ext(name: str) -> str:
    lower = name.lower()
    for ext in (*TAR_EXTS, ".parquet", ".npz", *IMAGE_EXTS):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _image_files_source(spec: str, files: list[Path], names: list[str], root: Path) -> Source:
    stems = [_strip_ext(n) for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    keys = [s if counts[s] == 1 else n for s, n in zip(stems, names, strict=True)]
    classes = tuple(sorted({n.split("/", 1)[0] for n in names if "/" in n}))
    parts = [
        SourcePart(
            spec,
            "folder",
            str(root),
            start,
            min(start + FOLDER_CHUNK, len(files)),
            items=tuple(names[start : start + FOLDER_CHUNK]),
            keys=tuple(keys[start : start + FOLDER_CHUNK]),
            classes=classes,
        )
        for start in range(0, len(files), FOLDER_CHUNK)
    ]
    digest_files = list(zip(names, files, strict=True))
    return Source(spec, "folder", parts, files=digest_files, classes=classes or None, size=len(files))


def _check_labels(spec: str, labels: np.ndarray | None, count: int) -> np.ndarray | None:
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


def _check_images_shape(spec: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise SourceError(f"{spec}: images must be uint8, got dtype {dtype}")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
        raise SourceError(f"{spec}: images must be N×H×W×3 (or N×H×W greyscale), got shape {shape}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise SourceError(f"{spec}: no images (shape {shape})")


def _array_source(images: np.ndarray, labels: np.ndarray | None, spec: str, kind: str) -> Source:
    _check_images_shape(spec, images.shape, images.dtype)
    checked = _check_labels(spec, labels, len(images))
    parts = [
        SourcePart(
            spec,
            "array",
            None,
            start,
            min(start + ARRAY_CHUNK, len(images)),
            images=images[start : start + ARRAY_CHUNK],
            labels=None if checked is None else checked[start : start + ARRAY_CHUNK],
        )
        for start in range(0, len(images), ARRAY_CHUNK)
    ]
    return Source(spec, kind, parts, size=len(images))


def _builtin_source(spec: str) -> Source:
    name = spec.split(":", 1)[1]
    if name != "digits":
        raise SourceError(
            f"{spec}: unknown builtin source; choose one of builtin:{', builtin:'.join(BUILTINS)}"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(images[:, :, :, None], 3, axis=3)
    source = _array_source(rgb, digits.target.astype(np.int64), spec, "builtin")
    source.classes = tuple(str(c) for c in digits.target_names)
    return source


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        return shape, dtype, fortran, fh.tell()


def _npz_source(spec: str, files: list[Path], stems: list[str], digest_files: list) -> Source:
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
        _check_images_shape(str(path), shape, dtype)
        if fortran:
            raise SourceError(f"{path}: 'x' is Fortran-ordered; save np.ascontiguousarray(x)")
        with np.load(path, allow_pickle=False) as npz:
            if "y" in npz.files:
                _check_labels(str(path), npz["y"], shape[0])
        for start in range(0, shape[0], ARRAY_CHUNK):
            parts.append(
                SourcePart(spec, "npz", str(path), start, min(start + ARRAY_CHUNK, shape[0]), name=stem)
            )
        total += shape[0]
    return Source(spec, "npz", parts, files=digest_files, size=total)


def _parquet_columns(schema: Any) -> tuple[str | None, str | None]:
    import pyarrow as pa

    names = list(schema.names)
    image = next((c for c in ("image", "img") if c in names), None)
    if image is None:
        image = next(
            (f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0),
            None,
        )
    label = next((c for c in LABEL_COLUMNS if c in names and pa.types.is_integer(schema.field(c).type)), None)
    return image, label


def _parquet_classes(schema: Any, label: str | None) -> tuple[str, ...] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if label is None or not meta:
        return None
    try:
        info = json.loads(meta)
        features = info.get("info", info).get("features", {})
        names = features.get(label, {}).get("names")
    except (ValueError, AttributeError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def _parquet_source(spec: str, files: list[Path], stems: list[str], digest_files: list) -> Source:
    import pyarrow.parquet as pq

    parts = []
    total = 0
    classes: tuple[str, ...] | None = None
    for path, stem in zip(files, stems, strict=True):
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for a damaged file
            raise SourceError(f"{path}: not a readable parquet file: {e}") from None
        schema = meta.schema_arrow
        image, label = _parquet_columns(schema)
        if image is None:
            raise SourceError(
                f"{path}: no image column (a struct {{bytes, path}} like Hugging Face's 'image'); "
                f"columns: {schema.names}"
            )
        classes = classes or _parquet_classes(schema, label)
        offset = 0
        for group in range(meta.metadata.num_row_groups):
            rows = meta.metadata.row_group(group).num_rows
            items = (image, label or "")
            parts.append(
                SourcePart(spec, "parquet", str(path), offset, offset + rows, name=stem, items=items)
            )
            offset += rows
        total += offset
    return Source(spec, "parquet", parts, files=digest_files, classes=classes, size=total)


# ---------------------------------------------------------------------------------------------- reading


def read_part(
    part: SourcePart, resolution: int, *, max_pixels: int = MAX_PIXELS
) -> Iterator[Sample | Reject]:
    """Every input of one part, in order, as a Sample (uint8 (R, R, 3)) or a Reject with its reason."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: must be a positive integer, got {resolution!r}")
    readers = {
        "folder": _read_folder,
        "tar": _read_tar,
        "parquet": _read_parquet,
        "npz": _read_npz,
        "array": _read_array,
    }
    if part.kind not in readers:
        raise ValueError(f"{part.source}: unknown part kind {part.kind!r}")
    return readers[part.kind](part, resolution, max_pixels)


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


def _decoded(key: str, data: bytes, label: int | None, resolution: int, max_pixels: int) -> Sample | Reject:
    try:
        return Sample(key, decode_image(data, resolution, max_pixels), label)
    except ImageRejected as e:
        return Reject(key, str(e))


def _read_folder(part: SourcePart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    root = Path(part.path or ".")
    class_ids = {name: i for i, name in enumerate(part.classes)}
    for name, key in zip(part.items, part.keys, strict=True):
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
        yield _decoded(key, data, label, resolution, max_pixels)


def _rows_rejected(part: SourcePart, reason: str) -> Iterator[Reject]:
    """One reject per row of a part that cannot be read, so counts still add up."""
    for row in range(part.start, part.stop or part.start):
        yield Reject(f"{part.name}:{row}", reason)


def _read_array(part: SourcePart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    assert part.images is not None
    for i, pixels in enumerate(part.images):
        label = None if part.labels is None else int(part.labels[i])
        yield Sample(str(part.start + i), array_image(pixels, resolution), label)


def _read_npz(part: SourcePart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    path = Path(part.path or "")
    stop = part.stop if part.stop is not None else part.start
    try:
        with zipfile.ZipFile(path) as zf:
            shape, dtype, _, offset = _npy_header(zf, "x.npy")
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            # Seek inside the member instead of np.load: a part reads only its rows, not the whole array.
            with zf.open("x.npy") as fh:
                fh.seek(offset + part.start * row_bytes)
                raw = fh.read((stop - part.start) * row_bytes)
        images = np.frombuffer(raw, dtype=dtype).reshape((stop - part.start, *shape[1:]))
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["y"][part.start : stop] if "y" in npz.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # changed or damaged since opening
        yield from _rows_rejected(part, f"cannot read rows from {path}: {type(e).__name__}: {e}")
        return
    for i, pixels in enumerate(images):
        label = None if labels is None else int(labels[i])
        yield Sample(f"{part.name}:{part.start + i}", array_image(pixels, resolution), label)


def _read_parquet(part: SourcePart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_col, label_col = part.items
    try:
        pf = pq.ParquetFile(part.path or "")
        offset, group = 0, 0
        while offset < part.start:
            offset += pf.metadata.row_group(group).num_rows
            group += 1
        table = pf.read_row_group(group, columns=[image_col] + ([label_col] if label_col else []))
    except Exception as e:  # pyarrow's errors for a damaged file are OSError/ArrowInvalid variants
        yield from _rows_rejected(part, f"cannot read rows from {part.path}: {type(e).__name__}: {e}")
        return
    column = table.column(image_col).combine_chunks()
    if pa.types.is_struct(column.type):
        blobs = column.field("bytes").to_pylist()
        paths = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else None
    else:
        blobs, paths = column.to_pylist(), None
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(blobs)
    for i, (blob, label) in enumerate(zip(blobs, labels, strict=True)):
        key = f"{part.name}:{part.start + i}"
        if blob is None:
            where = f" (path {paths[i]!r} is not read: only embedded bytes are)" if paths and paths[i] else ""
            yield Reject(key, f"no image bytes in column {image_col!r}{where}")
        elif label is not None and label < 0:
            yield Reject(key, f"label {label} in column {label_col!r} is negative")
        else:
            yield _decoded(key, blob, label, resolution, max_pixels)


def _unsafe_member(name: str) -> bool:
    path = name.replace("\\", "/")
    return path.startswith("/") or ".." in path.split("/") or (len(path) > 1 and path[1] == ":")


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: key = directory + basename up to its first dot; ext = the rest, lowercased."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_sample(key: str, members: dict[str, bytes], resolution: int, max_pixels: int) -> Sample | Reject:
    found = [e for e in TAR_IMAGE_EXTS if e in members]
    if not found:
        exts = ", ".join("." + e for e in sorted(members)) or "none"
        return Reject(key, f"no .jpg/.jpeg/.png/.webp member in the sample (members: {exts})")
    if len(found) > 1:
        return Reject(key, f"several image members in one sample: {', '.join('.' + e for e in found)}")
    label = None
    if "cls" in members:
        text = members["cls"].strip()
        try:
            label = int(text)
        except ValueError:
            return Reject(key, f".cls is not an integer label: {members['cls'][:32]!r}")
        if label < 0:
            return Reject(key, f".cls label {label} is negative")
    return _decoded(key, members[found[0]], label, resolution, max_pixels)


def _read_tar(part: SourcePart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    name = part.name
    try:
        fh = open(part.path or "", "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
    except OSError as e:
        yield Reject(name, f"cannot open tar: {e}")
        return
    with fh:
        try:
            # Stream mode ('r|*'): one sequential pass, and a truncated tar still yields what precedes the break.
            archive = tarfile.open(fileobj=fh, mode="r|*", bufsize=1 << 16)  # noqa: SIM115 - fh owns the file
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            yield Reject(name, f"not a readable tar archive: {e}")
            return
        key: str | None = None
        members: dict[str, bytes] = {}
        seen: set[str] = set()
        broken: str | None = None
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                broken = f"unreadable tar header at byte {archive.offset}: {e}"
                break
            archive.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise; nothing here looks back
            if member is None:
                broken = _tar_end_problem(fh, archive)
                break
            if member.isdir():
                continue
            if _unsafe_member(member.name):
                yield Reject(member.name, "unsafe member name (absolute path or '..'); skipped, never read")
                continue
            if not member.isfile():
                yield Reject(member.name, "not a regular file member (link or device); skipped")
                continue
            member_key, ext = _split_member(member.name)
            if not member_key or member_key.endswith("/"):
                yield Reject(member.name, "member name has no key before its extension")
                continue
            if member.size > MAX_BYTES:
                yield Reject(member.name, f"member is {member.size} bytes, over the limit of {MAX_BYTES}")
                continue
            if member_key != key:
                if key is not None:
                    yield _tar_sample(key, members, resolution, max_pixels)
                key, members = member_key, {}
                if member_key in seen:
                    key = None
                    yield Reject(member.name, f"key {member_key!r} appears again after other samples")
                    continue
                seen.add(member_key)
            if ext in members:
                yield Reject(member.name, "the sample already has this member; the first one is kept")
                continue
            try:
                extracted = archive.extractfile(member)
                assert extracted is not None
                members[ext] = extracted.read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                broken = f"member {member.name} cut off at byte {member.offset_data}: {e}"
                break
        if broken is None:
            if key is not None:
                yield _tar_sample(key, members, resolution, max_pixels)
        elif key is not None:
            yield Reject(key, f"tar {name} is truncated or corrupt ({broken}); this sample may be incomplete")
        else:
            yield Reject(f"{name}@{archive.offset}", f"tar {name} is truncated or corrupt ({broken})")


def _tar_end_problem(fh: Any, archive: tarfile.TarFile) -> str | None:
    """None when an uncompressed tar ends with its zero end-of-archive block where the members stop.

    tarfile stops quietly at a cut or garbled header after the first member; that silent loss is
    detected here for uncompressed tars (compressed ones report their cuts as decoder errors).
    """
    if getattr(archive.fileobj, "comptype", "tar") != "tar":
        return None
    block = os.pread(fh.fileno(), tarfile.BLOCKSIZE, archive.offset)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    return f"no end-of-archive block at byte {archive.offset} ({len(block)} bytes there)"


# ---------------------------------------------------------------------------------------------- reporting


@dataclass
class RejectReport:
    """Counts of produced and rejected inputs and the rejects themselves (JSON-able)."""

    produced: int = 0
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    @property
    def total(self) -> int:
        return self.produced + self.rejected

    def add(self, item: Sample | Reject) -> None:
        if isinstance(item, Sample):
            self.produced += 1
        else:
            self.rejects.append(item)

    def samples(self, items: Iterable[Sample | Reject]) -> Iterator[Sample]:
        """Passes Samples through and records every item: `for s in report.samples(iter_source(...))`."""
        for item in items:
            self.add(item)
            if isinstance(item, Sample):
                yield item

    def merge(self, other: RejectReport) -> RejectReport:
        return RejectReport(self.produced + other.produced, self.rejects + other.rejects)

    def to_json(self) -> list[dict[str, str]]:
        return [{"key": r.key, "reason": r.reason} for r in self.rejects]

    def summary(self) -> dict[str, int]:
        return {"produced": self.produced, "rejected": self.rejected}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Writes the rejects as a JSON list of {key, reason}."""
        out = Path(path)
        out.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return out


def summarize(results: Iterable[Sample | Reject]) -> RejectReport:
    """Consumes results and counts them (samples are not kept)."""
    report = RejectReport()
    for item in results:
        report.add(item)
    return report

"""parquet files in the Hugging Face `image` layout; one row group is one part.

The image column is a `{bytes, path}` struct named `image` or `img`, else the first such struct; the
label column is `label`, `labels`, `fine_label` or `coarse_label` (an integer column); ClassLabel names
in the schema's `huggingface` metadata become the source's classes (else a `classes.txt` beside the
files names them). Key = `<file stem>:<row>`. Only embedded bytes are read, never the `path` a row names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igpt_core.sources.base import Reject, Sample, SourceError, decoded, rows_rejected

LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")


@dataclass(frozen=True)
class ParquetPart:
    """The row group holding rows start..stop of one parquet file."""

    source: str
    path: str
    name: str
    """The file's name relative to the source root without `.parquet`: the keys' prefix."""
    start: int
    stop: int
    image_column: str
    label_column: str | None


def parquet_parts(
    spec: str, files: list[Path], stems: list[str]
) -> tuple[list[ParquetPart], tuple[str, ...] | None, int]:
    """(one part per row group, ClassLabel names of the first file naming them, total rows).

    Raises SourceError for a file that is not parquet or has no image column.
    """
    import pyarrow.parquet as pq  # heavy: pyarrow

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
            parts.append(ParquetPart(spec, str(path), stem, offset, offset + rows, image, label))
            offset += rows
        total += offset
    return parts, classes, total


def _parquet_columns(schema: Any) -> tuple[str | None, str | None]:
    """(image column, label column) of a pyarrow schema; None where there is none."""
    import pyarrow as pa  # heavy: pyarrow

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
    """The ClassLabel names of `label` in the schema's Hugging Face metadata, if it holds them."""
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


def read_parquet(part: ParquetPart, resolution: int, max_pixels: int) -> Iterator[Sample | Reject]:
    """The rows of the part's row group, decoded; a row without bytes or with a negative label is a Reject,
    and every row is one when the file cannot be read."""
    import pyarrow as pa  # heavy: pyarrow
    import pyarrow.parquet as pq  # heavy: pyarrow

    image_col, label_col = part.image_column, part.label_column
    try:
        pf = pq.ParquetFile(part.path)
        offset, group = 0, 0
        while offset < part.start:
            offset += pf.metadata.row_group(group).num_rows
            group += 1
        table = pf.read_row_group(group, columns=[image_col] + ([label_col] if label_col else []))
    except Exception as e:  # pyarrow's errors for a damaged file are OSError/ArrowInvalid variants
        reason = f"cannot read rows from {part.path}: {type(e).__name__}: {e}"
        yield from rows_rejected(part.name, part.start, part.stop, reason)
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
            yield decoded(key, blob, label, resolution, max_pixels)

"""Image sources: every input a user has, read as (key, uint8 RGB R×R image, label | None) or a reject.

Specs `open_source` understands, one module per kind (each holds its part type and its reader):

- a folder of images (`folder`): top-level sub-folders are classes (`Source.classes`), images directly
  in the folder are unlabelled; key = path relative to the folder without its extension. Hidden files
  and files of other types (README, CSV) are ignored.
- webdataset tars (`tar`): `x.tar`, a folder of tars, or a glob like `data/train-*.tar`; `.tar.gz`/`.tgz`
  too. Read as streams, never extracted; key = the webdataset key.
- parquet files in the Hugging Face `image` layout (`parquet`); key = `<file stem>:<row>`.
- `.npz` files holding `x` and optionally `y` (`npz`); no pickle; key = `<file stem>:<index>`.
  Tars, parquet and npz files name their classes with a `classes.txt` beside them (in the folder given,
  or the folder the file or glob's matches share): one name per line, in label order; it is part of the
  source's digest. A parquet file's own ClassLabel names take precedence.
- an in-memory uint8 array N×H×W×3 or N×H×W plus `labels=` (`array`); key = `<index>`.
- `builtin:digits` (`builtin`): scikit-learn's bundled 8×8 digits, read as an array.

A folder or glob holds files of one kind. Every image comes out as a C-contiguous uint8 (R, R, 3) array,
decoded and resized by `igpt_core.imaging` (its docstring holds the pixel rules); its public names are
re-exported here.

Bad input never stops a read: each input comes out either as a `Sample` or as a `Reject(key, reason)`.
A source with no valid image at all raises `SourceError` (from `iter_source`), as does a missing path.
"""

from igpt_core.imaging import MAX_PIXELS, ImageRejected, array_image, decode_image
from igpt_core.sources.array import ArrayPart
from igpt_core.sources.base import (
    ARRAY_CHUNK,
    CLASSES_FILE,
    MAX_BYTES,
    Reject,
    Sample,
    SourceError,
    read_class_names,
)
from igpt_core.sources.builtin import BUILTINS
from igpt_core.sources.folder import FOLDER_CHUNK, IMAGE_EXTS, FolderPart
from igpt_core.sources.npz import NpzPart
from igpt_core.sources.parquet import LABEL_COLUMNS, ParquetPart
from igpt_core.sources.source import Source, SourcePart, iter_source, open_source, read_part
from igpt_core.sources.tar import TAR_EXTS, TAR_IMAGE_EXTS, TarPart

__all__ = [
    "ARRAY_CHUNK",
    "BUILTINS",
    "CLASSES_FILE",
    "FOLDER_CHUNK",
    "IMAGE_EXTS",
    "LABEL_COLUMNS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "TAR_EXTS",
    "TAR_IMAGE_EXTS",
    "ArrayPart",
    "FolderPart",
    "ImageRejected",
    "NpzPart",
    "ParquetPart",
    "Reject",
    "Sample",
    "Source",
    "SourceError",
    "SourcePart",
    "TarPart",
    "array_image",
    "decode_image",
    "iter_source",
    "open_source",
    "read_class_names",
    "read_part",
]

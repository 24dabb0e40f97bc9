"""Token shards on disk: their tar format and writer, and a token folder's index (meta.json, manifest).

A token folder holds `<split>-NNNNNN.tar` shards, `manifest.parquet` (one row per shard: name, split,
samples, bytes, sha256) and `meta.json` (R, K, palette digest, `label_names` when the sources name their
classes, and per split the source digest, counts, rejects, shards and that split's `label_names`). One
folder holds one resolution, one palette and one label space; splits (train, test, ...) may share it.
`tokens.tokenize` writes folders (with `ShardWriter`); this module reads their index, `shard_reader`
their shards, and `data.read_shards` is each rank's stream over them.

A shard is an uncompressed tar of `<key>.cls` (label, ASCII digits; only when labelled) and
`<key>.tokens.npy` (np.save of a uint16 (R*R,) array) per sample, in input order. Every header carries
mtime 0, uid/gid 0, empty user and group names and mode 0644, so the same samples give the same bytes on
any machine. Dots in keys are escaped (webdataset splits a file name at its first dot).

The writer avoids tarfile's per-member cost by building the plain ustar headers itself (byte-identical
to tarfile's) and falls back to tarfile for long or non-ASCII names; `shard_reader` parses them the same
way. They are plain webdataset shards (a test reads them with webdataset).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow

FORMAT = "igpt-tokens/1"
META_NAME = "meta.json"
MANIFEST_NAME = "manifest.parquet"


class ShardError(ValueError):
    """A shard cannot be read (missing, cut, changed since written, or not token samples); names it."""


class TokenizeError(ShardError):
    """Tokens cannot be written or read as asked; the message names the folder, shard or palette."""


def _tar_key(key: str) -> str:
    """Escapes '.' (and '%'): webdataset splits a sample's file name at its first dot
    (`shard_reader._untar_key` undoes it)."""
    return key.replace("%", "%25").replace(".", "%2E")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """The header every member gets: no time, owner or permissions of the machine that wrote it."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


# The ustar header of `_tarinfo(name, size)` is constant except for the name, size and checksum. Building
# it from these pieces is byte-identical to TarInfo.tobuf (a test checks) and about 20x faster, which
# matters: headers were most of the write time at 2 members per sample.
_HEAD_AFTER_NAME = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HEAD_AFTER_SIZE = b"00000000000\0"  # mtime 0
_HEAD_TAIL = (
    b"0" + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * (64 + 16 + 155) + b"\0" * 12
)  # type, linkname, magic + version; uname, gname, devmajor, devminor (empty for regular files), prefix; pad
_HEAD_CONSTANT_SUM = sum(_HEAD_AFTER_NAME) + sum(_HEAD_AFTER_SIZE) + 8 * ord(" ") + sum(_HEAD_TAIL)


def _tar_header(name: str, size: int) -> bytes:
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii() or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT)  # long or non-ASCII names: a pax header
    name_field = encoded.ljust(100, b"\0")
    size_field = b"%011o\0" % size
    checksum = _HEAD_CONSTANT_SUM + sum(encoded) + sum(size_field)
    return b"".join(
        (name_field, _HEAD_AFTER_NAME, size_field, _HEAD_AFTER_SIZE, b"%06o\0 " % checksum, _HEAD_TAIL)
    )


class ShardWriter:
    """Writes one uncompressed tar shard to `path` (a temporary name), hashing it on the way.

    `close` fsyncs and returns the manifest entry. The bytes equal what tarfile writes for the same
    members (PAX format; header fields from `_tarinfo`), members in the order they were added.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Opened here and closed in close()/abort(): a shard outlives any one `with` block.
        self._file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._npy_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self.samples = 0
        self._sample_bytes: int | None = None  # the length of every sample so far; 0 once two differ

    def _write(self, data: bytes) -> None:
        self._sha256.update(data)
        self._size += len(data)
        self._file.write(data)

    def _member(self, name: str, data: bytes) -> None:
        self._write(_tar_header(name, len(data)))
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(b"\0" * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def _npy(self, tokens: np.ndarray) -> bytes:
        """np.save's bytes; its header depends only on dtype and shape, so it is made once."""
        signature = (tokens.dtype.str, tokens.shape)
        header = self._npy_headers.get(signature)
        if header is None:
            buffer = io.BytesIO()
            np.save(buffer, tokens, allow_pickle=False)
            header = buffer.getvalue()[: -tokens.nbytes or None]
            self._npy_headers[signature] = header
        return header + tokens.tobytes()

    def add(self, key: str, tokens: np.ndarray, label: int | None) -> None:
        name = _tar_key(key)
        start = self._size
        if label is not None:
            self._member(f"{name}.cls", str(int(label)).encode("ascii"))
        self._member(f"{name}.tokens.npy", self._npy(np.ascontiguousarray(tokens)))
        length = self._size - start
        self._sample_bytes = length if self._sample_bytes in (None, length) else 0
        self.samples += 1

    def close(self) -> dict[str, Any]:
        # End of archive: two zero blocks, then zeros up to a whole 10 KiB record, as tarfile does.
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        if self._size % tarfile.RECORDSIZE:
            self._write(b"\0" * (tarfile.RECORDSIZE - self._size % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {
            "tmp": self.path.name,
            "samples": self.samples,
            "bytes": self._size,
            "sha256": self._sha256.hexdigest(),
            # every sample this long (a reader can then seek to any one): None when they differ
            "sample_bytes": self._sample_bytes or None,
        }

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the folder's index: meta.json, manifest


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a token folder."""
    file = Path(path) / META_NAME
    if not file.is_file():
        raise TokenizeError(f"{path}: no {META_NAME}; is it a folder written by `igpt tokenize`?")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizeError(f"{file}: not valid JSON ({exc})") from exc


def label_names(path: str | os.PathLike[str], split: str | None = None) -> list[str] | None:
    """The class names of a token folder by label id (meta.json's `label_names`; with `split`, that
    split's), or None when its sources named no classes or the folder predates the key."""
    meta = read_meta(path)
    if split is None:
        names = meta.get("label_names")
    else:
        names = meta["splits"][_resolve_split(Path(path), meta, split)].get("label_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise TokenizeError(f"{Path(path) / META_NAME}: label_names must be a list of strings, got {names!r}")
    return names


def check_label_names(
    out_dir: str | os.PathLike[str], existing: dict[str, Any] | None, split: str, names: list[str] | None
) -> None:
    """Raises TokenizeError when `split` of a folder whose meta.json is `existing` would name other
    classes than another split: the splits share one label space (a test set missing a class folder
    numbers its classes differently)."""
    if names is None or existing is None:
        return
    for other, entry in existing["splits"].items():
        theirs = entry.get("label_names")
        if other != split and theirs is not None and theirs != names:
            raise TokenizeError(
                f"{out_dir}: split {other!r} names {shown_classes(theirs)}, this source names "
                f"{shown_classes(names)}; their labels would mean different classes (write to another folder)"
            )


def shown_classes(names: list[str] | tuple[str, ...]) -> str:
    """`3 classes [a, b, c]`, the first five named (for messages)."""
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} class{'es' if len(names) != 1 else ''} [{listed}]"


def read_manifest(path: str | os.PathLike[str]) -> pyarrow.Table:
    """manifest.parquet of a token folder: name, split, samples, bytes, sha256 per shard."""
    import pyarrow.parquet as pq  # heavy: pyarrow

    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise TokenizeError(f"{path}: no {MANIFEST_NAME}; is it a folder written by `igpt tokenize`?")
    return pq.read_table(file)


def _resolve_split(path: Path, meta: dict[str, Any], split: str | None) -> str:
    names = list(meta["splits"])
    if split is None:
        if len(names) != 1:
            raise TokenizeError(f"{path}: holds splits {', '.join(names) or '(none)'}; pass split=")
        return names[0]
    if split not in meta["splits"]:
        raise TokenizeError(f"{path}: has no split {split!r} (it holds {', '.join(names) or 'none'})")
    return split


def shard_entries(path: str | os.PathLike[str], split: str | None) -> list[dict[str, Any]]:
    """name/path, samples and sha256 of each shard to read, in order."""
    folder = Path(path)
    if folder.is_file():
        return [{"path": folder, "name": folder.name, "samples": None, "sha256": None}]
    if not folder.is_dir():
        raise TokenizeError(f"{path}: no such token folder or shard")
    if not (folder / META_NAME).exists():
        # A plain folder of shards (copied without the index): take every tar, optionally by prefix.
        tars = sorted(p for p in folder.glob("*.tar") if split is None or p.name.startswith(f"{split}-"))
        if not tars:
            raise TokenizeError(
                f"{path}: no shards{f' of split {split!r}' if split else ''} and no {META_NAME}"
            )
        return [{"path": p, "name": p.name, "samples": None, "sha256": None} for p in tars]
    meta = read_meta(folder)
    entry = meta["splits"][_resolve_split(folder, meta, split)]
    return [dict(shard, path=folder / shard["name"]) for shard in entry["shards"]]


def list_shards(path: str | os.PathLike[str], split: str | None = None) -> list[Path]:
    """The shard files of `split` in order (the only split when None); a single .tar path is itself."""
    return [entry["path"] for entry in shard_entries(path, split)]

"""Token shards on disk: the tar format of a shard, and a token folder's index (meta.json, manifest).

A token folder holds `<split>-NNNNNN.tar` shards, `manifest.parquet` (one row per shard: name, split,
samples, bytes, sha256) and `meta.json` (R, K, palette digest, `label_names` when the sources name their
classes, and per split the source digest, counts, rejects, shards and that split's `label_names`). One
folder holds one resolution, one palette and one label space; splits (train, test, ...) may share it.
`tokens.tokenize` writes folders; this module reads their index and shards; `data.read_shards` is each
rank's stream over them.

A shard is an uncompressed tar of `<key>.cls` (label, ASCII digits; only when labelled) and
`<key>.tokens.npy` (np.save of a uint16 (R*R,) array) per sample, in input order. Every header carries
mtime 0, uid/gid 0, empty user and group names and mode 0644, so the same samples give the same bytes on
any machine. Dots in keys are escaped (webdataset splits a file name at its first dot).

Both directions avoid tarfile's per-member cost where the format is plain ustar (the writer builds the
headers, the reader parses them) and fall back to tarfile for anything else (long or non-ASCII names).
Shards are parsed here rather than through `webdataset.WebDataset`: importing webdataset imports torch
(about a second), and its grouping is a few lines. They are plain webdataset shards (a test reads them
with webdataset).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
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
    """Escapes '.' (and '%'): webdataset splits a sample's file name at its first dot."""
    return key.replace("%", "%25").replace(".", "%2E")


def _untar_key(name: str) -> str:
    return name.replace("%2E", ".").replace("%25", "%")


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
        if label is not None:
            self._member(f"{name}.cls", str(int(label)).encode("ascii"))
        self._member(f"{name}.tokens.npy", self._npy(np.ascontiguousarray(tokens)))
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
        }

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def read_shard(
    shard: str | os.PathLike[str], sha256: str | None = None, *, verify: bool = False
) -> list[tuple[str, bytes | None, bytes | None]]:
    """(key, tokens.npy bytes, cls bytes) of every sample of one shard, in file order.

    With `verify`, the file's sha256 must equal `sha256` (the manifest's) before anything is read.
    """
    try:
        data = Path(shard).read_bytes()
    except OSError as exc:
        raise ShardError(f"{shard}: cannot read shard ({exc.strerror})") from exc
    if verify:
        if sha256 is None:
            raise ShardError(f"{shard}: no manifest entry to verify against")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ShardError(
                f"{shard}: sha256 {digest[:16]}... does not match the manifest's {sha256[:16]}... "
                "(the shard changed after it was written; rerun tokenize)"
            )
    return [
        (key, _payload(data, parts.get("tokens.npy")), _payload(data, parts.get("cls")))
        for key, parts in _index(shard, data)
    ]


def read_shard_head(
    shard: str | os.PathLike[str], count: int, *, size: int | None = None, samples: int | None = None
) -> tuple[list[tuple[str, bytes | None, bytes | None]], int]:
    """The first `count` samples of a shard (as `read_shard`) and the number of bytes read for them.

    A plain ustar shard (as `ShardWriter` writes) is read only as far as those samples reach: from the
    manifest's `size` (bytes) and `samples` of the shard the reader guesses how far that is, and reads on
    (doubling) when the guess falls short. Anything else is read whole.
    """
    return read_shard_rows(shard, range(count), size=size, samples=samples)


def read_shard_rows(
    shard: str | os.PathLike[str],
    rows: Sequence[int] | np.ndarray,
    *,
    size: int | None = None,
    samples: int | None = None,
) -> tuple[list[tuple[str, bytes | None, bytes | None]], int]:
    """Samples `rows` (file-order indices, in the order given) of a shard, as `read_shard_head` reads
    them: only as far as the last one, and only their files copied out."""
    if not len(rows):
        return [], 0
    count = int(np.max(rows)) + 1
    path = Path(shard)
    try:
        with open(path, "rb") as file:
            want = -1
            if size and samples and count < samples:
                want = -(-size * count // samples) + 4 * tarfile.BLOCKSIZE  # the member headers vary a little
            data = file.read(want)
            while True:
                ended = want < 0 or len(data) < want  # a short read: the whole file is in `data`
                if not ended:
                    try:
                        spans, complete = _ustar_spans(data, partial=True)
                    except _NotPlainUstar:
                        spans, complete = [], False
                        want, data = -1, data + file.read()
                        continue
                    except ValueError as exc:
                        raise ShardError(f"{shard}: not a readable tar ({exc})") from exc
                    groups = _group(spans)
                    if complete or len(groups) > count:  # sample count-1 is followed by another: it is whole
                        break
                    more = file.read(max(len(data), 1 << 16))
                    want, data = len(data) + max(len(data), 1 << 16), data + more
                    continue
                groups = _index(path, data)
                break
    except OSError as exc:
        raise ShardError(f"{shard}: cannot read shard ({exc.strerror})") from exc
    if len(groups) < count:
        raise ShardError(f"{shard}: holds {len(groups)} samples, sample {count - 1} was asked for")
    picked = [groups[int(row)] for row in rows]
    out = [
        (key, _payload(data, parts.get("tokens.npy")), _payload(data, parts.get("cls")))
        for key, parts in picked
    ]
    return out, len(data)


_Span = tuple[int, int]  # (start, size) of a member's bytes in the shard


def _payload(data: bytes, span: _Span | None) -> bytes | None:
    return None if span is None else data[span[0] : span[0] + span[1]]


def _index(shard: str | os.PathLike[str], data: bytes) -> list[tuple[str, dict[str, _Span]]]:
    """The samples of a whole shard in file order: key and where each of its files lies in `data`."""
    try:
        spans, _ = _ustar_spans(data, partial=False)
    except _NotPlainUstar:
        spans = _tarfile_spans(data)
    except ValueError as exc:
        raise ShardError(f"{shard}: not a readable tar ({exc})") from exc
    except tarfile.TarError as exc:
        raise ShardError(f"{shard}: not a readable tar ({exc})") from exc
    return _group(spans)


def _group(spans: list[tuple[str, int, int]]) -> list[tuple[str, dict[str, _Span]]]:
    """webdataset's grouping: the key is the directory plus the file name up to its first dot."""
    samples: list[tuple[str, dict[str, _Span]]] = []
    key: str | None = None
    parts: dict[str, _Span] = {}
    for name, start, size in spans:
        directory, _, base = name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if not dot:
            continue
        this = f"{directory}/{stem}" if directory else stem
        if "%" in this:
            this = _untar_key(this)
        if this != key:
            if key is not None:
                samples.append((key, parts))
            key, parts = this, {}
        parts[extension.lower()] = (start, size)
    if key is not None:
        samples.append((key, parts))
    return samples


class _NotPlainUstar(Exception):
    """The shard uses tar features the fast path does not read (pax or GNU headers, links)."""


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _ustar_spans(data: bytes, *, partial: bool) -> tuple[list[tuple[str, int, int]], bool]:
    """(name, start, size) of the regular files of a tar made of plain ustar headers, such as
    `ShardWriter` writes, and whether the end-of-archive block was reached; about 10x faster than
    tarfile. Raises _NotPlainUstar for anything else, ValueError when cut (unless `partial`: `data` is
    then a prefix of the file, and the members wholly inside it are returned)."""
    members: list[tuple[str, int, int]] = []
    headers: list[int] = []  # where each header starts, and the checksum it claims: checked together
    claimed: list[int] = []
    offset, end, ended = 0, len(data), False
    while offset + tarfile.BLOCKSIZE <= end:
        if data[offset] == 0 and data[offset : offset + tarfile.BLOCKSIZE] == _ZERO_BLOCK:
            ended = True
            break
        if (
            data[offset + 156 : offset + 157] not in (b"0", b"\0")
            or data[offset + 257 : offset + 262] != b"ustar"
            or data[offset + 345] != 0
            or data[offset + 124] & 0x80
        ):
            raise _NotPlainUstar  # pax/GNU extension headers, links, directories, a name prefix, base-256
        headers.append(offset)
        claimed.append(int(data[offset + 148 : offset + 155].rstrip(b" \0") or b"0", 8))
        size = int(data[offset + 124 : offset + 136].rstrip(b" \0") or b"0", 8)
        start = offset + tarfile.BLOCKSIZE
        if start + size > end:
            if partial:
                headers.pop(), claimed.pop()
                break
            _check_sums(data, headers, claimed)
            raise ValueError(f"member at byte {offset} is cut off ({size} bytes announced)")
        members.append((data[offset : offset + 100].split(b"\0", 1)[0].decode("utf-8"), start, size))
        offset = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    _check_sums(data, headers, claimed)
    if not ended and not partial:
        raise ValueError("no end-of-archive block (the shard is truncated)")
    return members, ended


def _check_sums(data: bytes, headers: list[int], claimed: list[int]) -> None:
    """Raises ValueError naming the first header whose checksum (the sum of its bytes, the checksum field
    counted as spaces) is not the one it claims; all headers at once, in numpy."""
    if not headers:
        return
    raw = np.frombuffer(data, dtype=np.uint8)
    width = np.arange(tarfile.BLOCKSIZE)
    for first in range(0, len(headers), 4096):
        starts = np.asarray(headers[first : first + 4096], dtype=np.int64)
        blocks = raw[starts[:, None] + width]  # (n, 512) uint8
        sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        bad = np.flatnonzero(sums != np.asarray(claimed[first : first + 4096]))
        if len(bad):
            raise ValueError(f"bad header checksum at byte {int(starts[bad[0]])}")


def _tarfile_spans(data: bytes) -> list[tuple[str, int, int]]:
    members: list[tuple[str, int, int]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            if info.isreg():
                members.append((info.name, info.offset_data, info.size))
            tar.members = []  # type: ignore[attr-defined]  # streaming: keep no headers
    return members


_NPY_HEADERS: dict[bytes, int] = {}  # npy v1 header bytes of a uint16 (n,) array -> n * 2


def decode_sample(
    shard: Path, key: str, raw: bytes | None, cls: bytes | None
) -> tuple[np.ndarray, int | None]:
    if raw is None:
        raise ShardError(f"{shard}: sample {key!r} has no tokens.npy")
    # np.load parses each header (about 100 us); every sample of a shard has the same header, so a
    # header seen (and validated by np.load) before is matched by its bytes instead.
    header_size = 10 + int.from_bytes(raw[8:10], "little") if raw[6:7] == b"\x01" else -1
    known = _NPY_HEADERS.get(raw[:header_size]) if header_size > 0 else None
    if known is not None and len(raw) == header_size + known:
        tokens = np.frombuffer(raw, dtype="<u2", offset=header_size).copy()  # writable, as np.load's
    else:
        try:
            tokens = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as exc:
            raise ShardError(f"{shard}: sample {key!r}: tokens.npy is not a plain array ({exc})") from exc
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ShardError(
                f"{shard}: sample {key!r}: tokens are {tokens.dtype} {tokens.shape}, not uint16 (R*R,)"
            )
        if header_size > 0 and len(_NPY_HEADERS) < 64 and tokens.dtype.byteorder in "<=":
            _NPY_HEADERS[raw[:header_size]] = tokens.nbytes
    label = None
    if cls is not None:
        try:
            label = int(cls.decode("ascii"))
        except ValueError:  # UnicodeDecodeError included
            raise ShardError(f"{shard}: sample {key!r}: .cls is not an integer ({cls[:20]!r})") from None
    return tokens, label


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


def verify_shards(path: str | os.PathLike[str], split: str | None = None) -> int:
    """Checks every shard of `split` against the manifest's sha256; returns the number checked."""
    entries = shard_entries(path, split)
    for entry in entries:
        read_shard(entry["path"], entry["sha256"], verify=True)
    return len(entries)

"""Reading token shards: every sample of one shard, its first samples or chosen rows, one sample's tokens
and label, and a folder's shards checked against its manifest.

A shard's format is described in `shards`. Shards are parsed here rather than through
`webdataset.WebDataset`: importing webdataset imports torch (about a second), and its grouping (a
sample's key is the directory plus the file name up to its first dot) is a few lines. Plain ustar
headers, such as `shards.ShardWriter` writes, are parsed directly, about 10x faster than tarfile and with
every header checksum checked; anything else (pax or GNU headers, long or non-ASCII names) is read with
tarfile. `read_shard_rows` reads a plain shard only as far as the last row asked for, and where every
sample of the shard has the same length (the manifest's `sample_bytes`), only the rows asked for.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from igpt_core.shards import ShardError, shard_entries


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
    sample_bytes: int | None = None,
) -> tuple[list[tuple[str, bytes | None, bytes | None]], int]:
    """Samples `rows` (file-order indices, in the order given) of a shard, as `read_shard_head` reads
    them: only as far as the last one, and only their files copied out.

    `sample_bytes` (the manifest's, for a shard whose samples all have that length) reads only the rows
    asked for when they leave gaps, as a rank's part of a shard shared with its neighbour does."""
    if not len(rows):
        return [], 0
    count = int(np.max(rows)) + 1
    path = Path(shard)
    if sample_bytes and len(rows) < count:
        return _read_strided(path, rows, sample_bytes)
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


def _read_strided(
    path: Path, rows: Sequence[int] | np.ndarray, sample_bytes: int
) -> tuple[list[tuple[str, bytes | None, bytes | None]], int]:
    """Rows of a shard whose samples are `sample_bytes` long each: sample r is the bytes at r * sample_bytes.
    The rows' bytes are laid end to end and parsed as one plain ustar run (every header checksum checked):
    it must hold exactly one sample per row, each starting where its row's bytes start."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            data = b"".join(view[int(row) * sample_bytes : (int(row) + 1) * sample_bytes] for row in rows)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror})") from exc
    except ValueError as exc:  # mmap of an empty file
        raise ShardError(f"{path}: cannot map shard ({exc})") from exc
    try:
        spans, _ = _ustar_spans(data, partial=True)
    except (_NotPlainUstar, ValueError) as exc:
        raise ShardError(
            f"{path}: its samples are not each {sample_bytes} bytes as its manifest entry (sample_bytes) says "
            f"({exc or 'not a plain ustar header'}); the shard changed after it was written (rerun tokenize)"
        ) from exc
    groups = _group(spans)
    starts = [min(start for start, _ in parts.values()) - tarfile.BLOCKSIZE for _, parts in groups]
    if len(groups) != len(rows) or starts != list(range(0, len(data), sample_bytes)):
        raise ShardError(
            f"{path}: {len(rows)} rows of {sample_bytes} bytes hold {len(groups)} samples, not one each as "
            "its manifest entry (sample_bytes) says; the shard changed after it was written (rerun tokenize)"
        )
    out = [
        (key, _payload(data, parts.get("tokens.npy")), _payload(data, parts.get("cls")))
        for key, parts in groups
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


def _untar_key(name: str) -> str:
    """The key `shards._tar_key` escaped: '.' and '%' back from %2E and %25."""
    return name.replace("%2E", ".").replace("%25", "%")


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


def verify_shards(path: str | os.PathLike[str], split: str | None = None) -> int:
    """Checks every shard of `split` against the manifest's sha256; returns the number checked."""
    entries = shard_entries(path, split)
    for entry in entries:
        read_shard(entry["path"], entry["sha256"], verify=True)
    return len(entries)

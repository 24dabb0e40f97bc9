"""Pins what the pipeline's cache depends on: the digest, keys, order, labels and reject reasons of a small
source of every kind. The constants were computed on the single-module `sources.py` before it became a
package; a changed value here is a changed content address, i.e. a behaviour change."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from igpt_core.sources import Reject, Sample, iter_source, open_source, read_part


def files_digest(kind: str, files: list[tuple[str, Path]]) -> str:
    """The documented digest of a file source, written out independently of the code under test."""
    h = hashlib.sha256(f"igpt-source-v1:{kind}\n".encode())
    for name, path in files:
        h.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def outcomes(items) -> list[tuple[str, int | None | str]]:
    """(key, label) for a Sample, (key, 'reject: reason') for a Reject, in order."""
    return [(i.key, i.label) if isinstance(i, Sample) else (i.key, f"reject: {i.reason}") for i in items]


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, "PNG")
    return buf.getvalue()


def test_array_digest_keys_and_labels_are_pinned():
    images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    source = open_source(images, labels=np.array([2, 0, 1]))
    assert source.kind == "array" and source.size == 3 and source.classes is None
    assert source.digest() == "3daa2a730d622c6a62eb861ce982a356cbdfa590a3b682767bfdf3acc226ed78"
    assert outcomes(iter_source(source, 4)) == [("0", 2), ("1", 0), ("2", 1)]
    unlabelled = open_source(images[:, :, :, 0])
    assert unlabelled.digest() == "e91c70872a89c574d474a5b9d45c5293ba2730bcb8fa6cca2f44e557bc5e67b1"
    part = pickle.loads(pickle.dumps(source.parts()[0]))
    np.testing.assert_array_equal(next(read_part(part, 4)).image, images[0])


def test_builtin_digest_and_keys_are_pinned():
    source = open_source("builtin:digits")
    assert source.kind == "builtin" and source.size == 1797
    assert source.digest() == "1ce6871e730cf8134314f755fe5224916f4dd7479576df18dd946cdb6d2e8979"
    assert [(p.start, p.stop) for p in source.parts()] == [(0, 1797)]
    assert outcomes(iter_source(source, 8))[:3] == [("0", 0), ("1", 1), ("2", 2)]


def test_folder_digest_keys_labels_and_reasons_are_pinned(tmp_path):
    for name, data in [
        ("b/x.png", png((10, 20, 30))),
        ("a/y.jpg", b""),
        ("a/y.png", b"not an image"),
        ("z.webp", png((1, 2, 3))),
        ("a/deep/w.bmp", png((4, 5, 6))),
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    source = open_source(tmp_path)
    names = ["a/deep/w.bmp", "a/y.jpg", "a/y.png", "b/x.png", "z.webp"]
    assert source.digest() == files_digest("folder", [(n, tmp_path / n) for n in names])
    assert source.kind == "folder" and source.classes == ("a", "b") and source.size == 5
    assert outcomes(iter_source(source, 4)) == [
        ("a/deep/w", 0),
        ("a/y.jpg", "reject: empty file (0 bytes)"),
        ("a/y.png", "reject: not a recognised image (12 bytes, starts b'not an i')"),
        ("b/x", 1),
        ("z", None),
    ]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "one.png").write_bytes(b"\x89PNG fixed bytes")
    (raw / "two.jpg").write_bytes(b"\xff\xd8 fixed bytes")
    assert open_source(raw).digest() == "b73d529e6ab2be72552e393636e74083eefe15d160583a228bad40b11fbd6707"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_digest_keys_labels_and_reasons_are_pinned(tmp_path):
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "b" / "one.tar", [("k1.png", png((9, 9, 9))), ("k1.cls", b"3"), ("k2.cls", b"1")])
    write_tar(tmp_path / "two.tar", [("d/k3.png", png((8, 8, 8))), ("../bad.png", b"x")])
    source = open_source(str(tmp_path / "**" / "*.tar"))
    names = ["b/one.tar", "two.tar"]
    assert source.digest() == files_digest("tar", [(n, tmp_path / n) for n in names])
    assert source.kind == "tar" and source.size is None and source.classes is None
    assert [p.name for p in source.parts()] == names
    assert outcomes(iter_source(source, 4)) == [
        ("k1", 3),
        ("k2", "reject: no .jpg/.jpeg/.png/.webp member in the sample (members: .cls)"),
        ("../bad.png", "reject: unsafe member name (absolute path or '..'); skipped, never read"),
        ("d/k3", None),
    ]
    (tmp_path / "fixed.tar").write_bytes(b"fixed bytes, never opened as a tar by open_source")
    fixed = open_source(tmp_path / "fixed.tar")
    assert fixed.digest() == "612101b7596d0b4ee3f038eec05f07e73ef4079bb420d6313c0b0e16e1c1f853"
    assert outcomes(read_part(fixed.parts()[0], 4)) == [
        ("fixed.tar", "reject: not a readable tar archive: truncated header")
    ]


def test_npz_digest_keys_and_labels_are_pinned(tmp_path):
    x = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([4, 3, 2, 1, 0]))
    np.savez(tmp_path / "b.npz", x=x[:2, :, :, 0])
    source = open_source(tmp_path)
    assert source.digest() == files_digest(
        "npz", [("a.npz", tmp_path / "a.npz"), ("b.npz", tmp_path / "b.npz")]
    )
    assert source.kind == "npz" and source.size == 7
    assert outcomes(iter_source(source, 4)) == [
        ("a:0", 4),
        ("a:1", 3),
        ("a:2", 2),
        ("a:3", 1),
        ("a:4", 0),
        ("b:0", None),
        ("b:1", None),
    ]


def test_parquet_digest_keys_labels_and_reasons_are_pinned(tmp_path):
    image = pa.array(
        [{"bytes": png((i, i, i)) if i != 1 else None, "path": f"p{i}.png"} for i in range(3)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"img": image, "fine_label": pa.array([5, 6, -1], pa.int32())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    source = open_source(tmp_path / "t.parquet")
    assert source.digest() == files_digest("parquet", [("t.parquet", tmp_path / "t.parquet")])
    assert source.kind == "parquet" and source.size == 3 and source.classes is None
    assert [(p.start, p.stop) for p in source.parts()] == [(0, 2), (2, 3)]
    assert outcomes(iter_source(source, 4)) == [
        ("t:0", 5),
        (
            "t:1",
            "reject: no image bytes in column 'img' (path 'p1.png' is not read: only embedded bytes are)",
        ),
        ("t:2", "reject: label -1 in column 'fine_label' is negative"),
    ]


def test_no_valid_image_message_is_pinned(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    source = open_source(tmp_path)
    try:
        list(iter_source(source, 4))
    except ValueError as e:
        assert str(e) == f"{tmp_path}: no valid image (1 rejected: a: empty file (0 bytes))"
    else:
        raise AssertionError("expected SourceError")
    assert all(isinstance(r, Reject) for r in read_part(source.parts()[0], 4))

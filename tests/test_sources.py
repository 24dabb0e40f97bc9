"""Image sources: every source kind, every bad input, keys, parts and digests."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from igpt_core.sources import (
    ArrayPart,
    FolderPart,
    NpzPart,
    ParquetPart,
    Reject,
    Sample,
    SourceError,
    TarPart,
    iter_source,
    open_source,
    read_part,
)
from igpt_core.sources import array as array_kind
from igpt_core.sources import folder as folder_kind
from igpt_core.sources import npz as npz_kind

# ------------------------------------------------------------------------------------------- helpers


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth-ish RGB image (JPEG keeps it close) of the given (width, height)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height RGB pixels, followed by a few bytes of pixel data only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def by_key(items) -> dict[str, Sample | Reject]:
    return {item.key: item for item in items}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def labelled_samples(count: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        members.append((f"s{i:03d}.jpg", encode(noise((32, 32), seed=i), "JPEG", quality=90)))
        members.append((f"s{i:03d}.cls", str(i % 10).encode()))
    return members


# ------------------------------------------------------------------------------------------- builtin and arrays


def test_builtin_digits_are_labelled_rgb_and_scaled_from_0_16():
    from sklearn.datasets import load_digits

    source = open_source("builtin:digits")
    items = list(iter_source(source, 8))
    digits = load_digits()
    assert len(items) == len(digits.images) == 1797
    assert all(isinstance(s, Sample) for s in items)
    first = items[0]
    assert first.image.shape == (8, 8, 3) and first.image.dtype == np.uint8
    expected = np.rint(digits.images[0] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(first.image[:, :, 0], expected)
    np.testing.assert_array_equal(first.image[:, :, 0], first.image[:, :, 2])
    assert [s.label for s in items] == digits.target.tolist()
    assert source.classes == tuple(str(i) for i in range(10))
    big = next(iter(read_part(source.parts()[0], 32)))
    upscaled = Image.fromarray(expected).resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(big.image[:, :, 1], np.asarray(upscaled))


def test_array_source_keys_labels_chunks_and_resizing(monkeypatch):
    monkeypatch.setattr(array_kind, "ARRAY_CHUNK", 4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    source = open_source(images, labels=labels)
    parts = source.parts()
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    restored = pickle.loads(pickle.dumps(parts[1]))
    items = list(read_part(restored, 16))
    assert [s.key for s in items] == ["4", "5", "6", "7"]
    assert [s.label for s in items] == [1, 2, 0, 1]
    np.testing.assert_array_equal(items[0].image, images[4])  # already R×R: untouched
    resized = list(iter_source(source, 8))
    reference = np.asarray(Image.fromarray(images[9]).resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(resized[9].image, reference)
    grey = list(iter_source(open_source(images[:, :, :, 0]), 16))
    np.testing.assert_array_equal(grey[3].image, np.repeat(images[3, :, :, :1], 3, axis=2))


def test_array_source_rejects_bad_arrays_with_clear_errors():
    with pytest.raises(SourceError, match="uint8, got dtype float32"):
        open_source(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(SourceError, match=r"labels have shape \(3,\), expected \(2,\)"):
        open_source(np.zeros((2, 8, 8, 3), np.uint8), labels=np.arange(3))
    with pytest.raises(SourceError, match="labels must be integers"):
        open_source(np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0.5, 1.0]))
    with pytest.raises(SourceError, match="shape"):
        open_source(np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="resolution"):
        next(read_part(open_source(np.zeros((1, 8, 8, 3), np.uint8)).parts()[0], 0))


# ------------------------------------------------------------------------------------------- folders


def test_folder_classes_keys_and_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_kind, "FOLDER_CHUNK", 2)
    for cls, count in (("dog", 2), ("cat", 3)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / cls / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "0.jpg")  # same stem as cat/0.png
    (tmp_path / "notes.txt").write_text("not an image and ignored")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    source = open_source(tmp_path)
    assert source.classes == ("cat", "dog")
    assert source.size == 6
    assert [(p.start, p.stop) for p in source.parts()] == [(0, 2), (2, 4), (4, 6)]
    items = list(iter_source(source, 8))
    assert [s.key for s in items] == ["cat/0.jpg", "cat/0.png", "cat/1", "cat/2", "dog/0", "dog/1"]
    assert [s.label for s in items] == [0, 0, 0, 0, 1, 1]
    assert open_source(tmp_path).parts() == source.parts()  # deterministic
    root_only = tmp_path / "flat"
    root_only.mkdir()
    Image.new("L", (8, 8)).save(root_only / "a.png")
    (root_only / "loop").symlink_to(root_only)  # a link cycle is walked once
    flat = list(iter_source(open_source(root_only), 8))
    assert [s.key for s in flat] == ["a"]
    assert flat[0].label is None and open_source(root_only).classes is None


def test_bad_and_unusual_images_each_get_a_clear_outcome(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    good_jpeg = encode(noise((64, 64)), "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "text.jpg").write_text("this is not an image\n" * 10)
    (folder / "huge.png").write_bytes(png_claiming(30000, 30000))
    (folder / "big.png").write_bytes(png_claiming(9000, 9000))  # 81 M pixels: over our limit, under PIL's

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 60)
    rgb[:, 8:] = (20, 180, 90)
    (folder / "cmyk.jpg").write_bytes(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))

    wide = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    (folder / "deep.png").write_bytes(encode(Image.fromarray(wide), "PNG"))

    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.paste(1, (0, 0, 16, 8))
    (folder / "palette.png").write_bytes(encode(pal, "PNG", transparency=0))

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255
    rgba[4:8, :, 3] = 128
    (folder / "rgba.png").write_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"))

    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    (folder / "grey.png").write_bytes(encode(Image.fromarray(grey), "PNG"))

    source = open_source(folder)
    results = list(iter_source(source, 16))
    items = by_key(results)
    produced = sum(isinstance(item, Sample) for item in results)
    rejected = sum(isinstance(item, Reject) for item in results)
    assert produced + rejected == len(results) == len(list(folder.iterdir())) == 10
    assert produced == 5 and rejected == 5
    for sample in items.values():
        if isinstance(sample, Sample):
            assert sample.image.shape == (16, 16, 3) and sample.image.dtype == np.uint8
            assert sample.image.flags.c_contiguous and sample.image.flags.writeable

    assert "empty" in items["empty"].reason
    assert isinstance(items["truncated"], Reject) and "truncated" in items["truncated"].reason.lower()
    assert "not a recognised image" in items["text"].reason
    assert isinstance(items["huge"], Reject) and "too large" in items["huge"].reason
    assert items["big"].reason == "image is 9000x9000 = 81000000 pixels, over the limit of 67108864"

    cmyk = items["cmyk"].image
    assert np.abs(cmyk[4, 2].astype(int) - (200, 30, 60)).max() <= 8
    assert np.abs(cmyk[4, 12].astype(int) - (20, 180, 90)).max() <= 8

    deep = items["deep"].image[:, :, 0].astype(int)
    np.testing.assert_array_equal(deep, np.rint(wide / 257).astype(int))  # scaled, not clipped at 255
    assert deep.min() == 0 and deep.max() == 255 and 120 <= deep[8, 0] <= 136

    palette = items["palette"].image
    assert tuple(palette[0, 0]) == (0, 255, 0)
    assert tuple(palette[15, 15]) == (255, 255, 255)  # transparent index over white

    over_white = items["rgba"].image
    assert tuple(over_white[0, 0]) == (255, 0, 0)
    assert tuple(over_white[15, 0]) == (255, 255, 255)
    assert np.abs(over_white[5, 0].astype(int) - (255, 127, 127)).max() <= 1

    np.testing.assert_array_equal(items["grey"].image, np.repeat(grey[:, :, None], 3, axis=2))


def test_max_pixels_limit_is_read_from_the_header(tmp_path):
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "a.png")
    part = open_source(tmp_path).parts()[0]
    assert isinstance(next(read_part(part, 32)), Sample)
    rejected = next(read_part(part, 32, max_pixels=5000))
    assert rejected == Reject("a", "image is 100x100 = 10000 pixels, over the limit of 5000")


def test_resize_is_centre_crop_then_bicubic_and_jpeg_draft_is_deterministic(tmp_path):
    image = noise((64, 48), seed=3)
    (tmp_path / "wide.png").write_bytes(encode(image, "PNG"))
    (tmp_path / "photo.jpg").write_bytes(encode(noise((256, 256), seed=4), "JPEG", quality=95))
    items = by_key(iter_source(open_source(tmp_path), 32))
    reference = image.resize((32, 32), Image.Resampling.BICUBIC, box=(8, 0, 56, 48))
    np.testing.assert_array_equal(items["wide"].image, np.asarray(reference))
    again = by_key(iter_source(open_source(tmp_path), 32))
    np.testing.assert_array_equal(items["photo"].image, again["photo"].image)
    full = Image.open(tmp_path / "photo.jpg").convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    assert np.abs(items["photo"].image.astype(int) - np.asarray(full).astype(int)).mean() < 3


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = (250, 0, 0)
    pixels[:, 16:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    (tmp_path / "r.jpg").write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif))
    sample = next(iter_source(open_source(tmp_path), 32))
    assert sample.image[16, 4, 2] > 200 and sample.image[16, 28, 0] > 200


# ------------------------------------------------------------------------------------------- tars


def test_tar_samples_labels_and_bad_members(tmp_path):
    png = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG")
    webp = encode(Image.new("RGB", (32, 32), (9, 9, 9)), "WEBP", lossless=True)
    members = [
        *labelled_samples(2),
        ("p.png", png),
        ("w.webp", webp),
        ("w.cls", b"7\n"),
        ("bad.jpg", encode(noise((32, 32)), "JPEG")),
        ("bad.cls", b"cat"),
        ("../x.jpg", png),
        ("/etc/x.jpg", png),
        ("only.cls", b"1"),
        ("sub/dir.png", png),
        ("sub/dir.png", webp),
    ]
    path = write_tar(tmp_path / "data.tar", members)
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    source = open_source(path)
    items = list(iter_source(source, 32))
    found = by_key(items)
    assert [s.key for s in items if isinstance(s, Sample)] == ["s000", "s001", "p", "w", "sub/dir"]
    assert found["s001"].label == 1 and found["p"].label is None and found["w"].label == 7
    assert tuple(found["p"].image[0, 0]) == (1, 2, 3)
    assert ".cls is not an integer" in found["bad"].reason
    assert "unsafe member name" in found["../x.jpg"].reason
    assert "unsafe member name" in found["/etc/x.jpg"].reason
    assert "no .jpg/.jpeg/.png/.webp member" in found["only"].reason
    assert "not a regular file" in found["link.jpg"].reason
    assert "first one is kept" in found["sub/dir.png"].reason and tuple(found["sub/dir"].image[0, 0]) == (
        1,
        2,
        3,
    )
    assert not (tmp_path.parent / "x.jpg").exists() and not (tmp_path / "x.jpg").exists()
    produced = sum(isinstance(item, Sample) for item in items)
    rejected = sum(isinstance(item, Reject) for item in items)
    assert (produced, rejected) == (5, 6)  # 7 sample keys + 2 unsafe names + 1 link + 1 repeat


def test_truncated_tar_keeps_samples_before_the_break(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", labelled_samples(5))
    with tarfile.open(whole) as tar:
        fourth = tar.getmember("s003.jpg")
        third_cls = tar.getmember("s002.cls")
    data = whole.read_bytes()

    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: fourth.offset_data + fourth.size // 2])
    items = list(iter_source(open_source(cut), 32))
    assert [s.key for s in items if isinstance(s, Sample)] == ["s000", "s001", "s002"]
    (broken,) = [r for r in items if isinstance(r, Reject)]
    assert broken.key == "s003" and "truncated" in broken.reason

    at_boundary = tmp_path / "boundary.tar"
    at_boundary.write_bytes(data[: third_cls.offset_data + 512])
    items = list(iter_source(open_source(at_boundary), 32))
    assert [s.key for s in items if isinstance(s, Sample)] == ["s000", "s001"]
    (broken,) = [r for r in items if isinstance(r, Reject)]
    assert broken.key == "s002" and "end-of-archive" in broken.reason

    garbled = bytearray(data)
    garbled[fourth.offset : fourth.offset + 512] = b"\x07" * 512  # a header tarfile skips silently
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    items = list(iter_source(open_source(tmp_path / "garbled.tar"), 32))
    assert [s.key for s in items if isinstance(s, Sample)] == ["s000", "s001"]
    (broken,) = [r for r in items if isinstance(r, Reject)]
    assert broken.key == "s002" and "no end-of-archive block" in broken.reason


def test_tar_specs_folder_glob_and_unreadable(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "train-000001.tar", labelled_samples(2)[2:])
    write_tar(shards / "train-000000.tar", labelled_samples(1))
    (shards / "README.md").write_text("ignored")
    by_folder = open_source(shards)
    by_glob = open_source(str(shards / "train-*.tar"))
    assert [p.name for p in by_folder.parts()] == ["train-000000.tar", "train-000001.tar"]
    assert by_glob.parts()[0].name == "train-000000.tar"
    assert [s.key for s in iter_source(by_glob, 32)] == ["s000", "s001"]
    assert by_folder.digest() == by_glob.digest()

    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(SourceError, match=r"junk\.tar: no valid image .*not a readable tar"):
        list(iter_source(open_source(tmp_path / "junk.tar"), 32))


# ------------------------------------------------------------------------------------------- parquet, npz


def test_parquet_in_hugging_face_image_layout(tmp_path):
    blobs = [encode(Image.new("RGB", (16, 16), (i * 30, 0, 0)), "PNG") for i in range(6)]
    blobs[4] = None
    blobs[5] = b"\x00garbage"
    image = pa.array(
        [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(blobs)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["a", "b", "c"]}}}}
    table = pa.table({"image": image, "label": pa.array([0, 1, 2, 0, 1, 2], pa.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=4)
    source = open_source(tmp_path)
    assert source.classes == ("a", "b", "c") and source.size == 6
    assert [(p.start, p.stop) for p in source.parts()] == [(0, 4), (4, 6)]
    items = list(iter_source(source, 16))
    assert [s.key for s in items][:2] == ["train-00000-of-00001:0", "train-00000-of-00001:1"]
    assert [s.label for s in items[:4]] == [0, 1, 2, 0]
    assert tuple(items[3].image[0, 0]) == (90, 0, 0)
    assert "no image bytes" in items[4].reason and "img4.png" in items[4].reason
    assert "not a recognised image" in items[5].reason


def test_npz_rows_read_by_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(npz_kind, "ARRAY_CHUNK", 3)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (7, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", x=x, y=np.arange(7))
    np.savez_compressed(tmp_path / "grey.npz", x=x[..., 0])
    plain = open_source(tmp_path / "plain.npz")
    assert [(p.start, p.stop) for p in plain.parts()] == [(0, 3), (3, 6), (6, 7)]
    items = list(read_part(plain.parts()[1], 12))
    assert [s.key for s in items] == ["plain:3", "plain:4", "plain:5"]
    assert [s.label for s in items] == [3, 4, 5]
    np.testing.assert_array_equal(items[2].image, x[5])
    grey = list(iter_source(open_source(tmp_path / "grey.npz"), 12))
    np.testing.assert_array_equal(grey[6].image[:, :, 1], x[6, :, :, 0])
    assert grey[6].label is None
    (tmp_path / "plain.npz").write_bytes(b"damaged after opening")
    damaged = list(read_part(plain.parts()[2], 12))
    assert [(r.key, "cannot read rows" in r.reason) for r in damaged] == [("plain:6", True)]
    np.savez(tmp_path / "bad.npz", x=x.astype(np.int16))
    with pytest.raises(SourceError, match=r"bad\.npz: images must be uint8"):
        open_source(tmp_path / "bad.npz")


def test_classes_txt_beside_tars_npz_and_parquet_names_their_classes(tmp_path):
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(tars / "train-000000.tar", labelled_samples(2))
    unnamed = open_source(tars)
    assert unnamed.classes is None
    (tars / "classes.txt").write_text("airplane\n automobile \n\n")  # stripped; blank lines at the end
    for spec in (tars, tars / "train-000000.tar", str(tars / "train-*.tar")):
        assert open_source(spec).classes == ("airplane", "automobile")
    # the names are part of what the data means: a changed classes.txt is a changed source
    named = open_source(tars).digest()
    assert named != unnamed.digest()
    (tars / "classes.txt").write_text("plane\ncar\n")
    assert open_source(tars).digest() != named

    np.savez(tmp_path / "rows.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([0, 1]))
    (tmp_path / "classes.txt").write_text("zero\none\n")
    assert open_source(tmp_path / "rows.npz").classes == ("zero", "one")

    blobs = pa.array(
        [{"bytes": encode(Image.new("RGB", (8, 8)), "PNG"), "path": None}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": blobs, "label": pa.array([0])}), tmp_path / "t.parquet")
    assert open_source(tmp_path / "t.parquet").classes == ("zero", "one")
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["own", "names"]}}}}
    table = pa.table({"image": blobs, "label": pa.array([0])})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), tmp_path / "t.parquet")
    assert open_source(tmp_path / "t.parquet").classes == ("own", "names")  # the file's own come first

    for text, problem in (("a\n\nb\n", "line 2 is blank"), ("a\nb\na\n", "repeated: a"), ("\n", "line 1")):
        (tars / "classes.txt").write_text(text)
        with pytest.raises(SourceError, match=rf"classes\.txt: .*{problem}"):
            open_source(tars)


# ------------------------------------------------------------------------------------------- errors, digests


def test_source_errors_name_the_source(tmp_path):
    missing = tmp_path / "nowhere" / "data.tar"
    with pytest.raises(SourceError, match=f"{missing}: no such file or directory"):
        open_source(missing)
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(tmp_path / "train-*.tar"))
    with pytest.raises(SourceError, match="holds no images"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="unknown builtin"):
        open_source("builtin:mnist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("no")
    with pytest.raises(SourceError, match=rf"{bad}: no valid image \(2 rejected: a: empty"):
        list(iter_source(open_source(bad), 32))
    (bad / "c.tar").write_bytes(b"")
    with pytest.raises(SourceError, match="of one kind; found image: 2, tar: 1"):
        open_source(bad)


def test_digest_is_content_based_and_location_independent(tmp_path):
    first = tmp_path / "a"
    (first / "cls").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(first / "cls" / f"{i}.png")
    digest = open_source(first).digest()
    assert len(digest) == 64 and digest == open_source(first).digest()
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, moved)
    assert open_source(moved).digest() == digest
    Image.new("RGB", (8, 8), (9, 9, 9)).save(moved / "cls" / "1.png")
    assert open_source(moved).digest() != digest

    images = np.zeros((5, 4, 4, 3), np.uint8)
    base = open_source(images, labels=np.zeros(5, np.int64)).digest()
    assert open_source(images.copy(), labels=np.zeros(5, np.int32)).digest() == base
    assert open_source(images, labels=np.ones(5, np.int64)).digest() != base
    assert open_source(images.reshape(5, 2, 8, 3)).digest() != open_source(images).digest()


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_cifar_test_tar_gives_10000_labelled_samples(cifar_dir):
    source = open_source(cifar_dir / "test-000000.tar")
    counts = {"produced": 0, "rejected": 0}
    labels = []
    keys = set()
    for sample in iter_source(source, 32):
        if not isinstance(sample, Sample):
            counts["rejected"] += 1
            continue
        counts["produced"] += 1
        assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
        labels.append(sample.label)
        keys.add(sample.key)
    assert counts == {"produced": 10000, "rejected": 0}
    assert len(keys) == 10000
    assert np.bincount(labels).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------- parts


def test_every_kind_has_its_own_frozen_picklable_part(tmp_path):
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "a.png")
    write_tar(tmp_path / "data.tar", labelled_samples(1))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 8, 8, 3), np.uint8))
    image = pa.array([{"bytes": encode(Image.new("RGB", (8, 8)), "PNG"), "path": None}])
    pq.write_table(pa.table({"image": image}), tmp_path / "t.parquet")
    specs = {
        FolderPart: tmp_path / "folder",
        TarPart: tmp_path / "data.tar",
        NpzPart: tmp_path / "x.npz",
        ParquetPart: tmp_path / "t.parquet",
        ArrayPart: np.zeros((2, 8, 8, 3), np.uint8),
    }
    for kind, spec in specs.items():
        source = open_source(spec)
        (part,) = source.parts()
        assert type(part) is kind and dataclasses.is_dataclass(part)
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.source = "elsewhere"  # type: ignore[misc]
        restored = pickle.loads(pickle.dumps(part))
        assert restored == part
        assert [i.key for i in read_part(restored, 8)] == [i.key for i in read_part(part, 8)]
    with pytest.raises(ValueError, match="not a source part"):
        read_part("data.tar", 8)  # type: ignore[arg-type]

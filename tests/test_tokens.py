"""Token shards: deterministic atomic writing, accounting of rejects, reading back by rank, verification."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_core.data import load_tokens, read_shards, samples_per_rank
from igpt_core.palette import Palette
from igpt_core.shard_reader import verify_shards
from igpt_core.shards import (
    ShardError,
    ShardWriter,
    TokenizeError,
    label_names,
    list_shards,
    read_manifest,
    read_meta,
)
from igpt_core.tokens import tokenize

R = 8
N = 53  # not a multiple of the shard size or of the world sizes below


def _palette(clusters: int = 32, seed: int = 0) -> Palette:
    centers = np.random.default_rng(seed).uniform(-1, 1, size=(clusters, 3)).astype(np.float32)
    return Palette(centers=centers)


def _images(n: int = N, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, R, R, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def written(tmp_path_factory, ray_local):
    """One tokenize run of N labelled random images into shards of 10, shared by the read tests."""
    from igpt_core.sources import open_source

    images, labels = _images()
    palette = _palette()
    out = tmp_path_factory.mktemp("tokens")
    result = tokenize(open_source(images, labels), palette, out, resolution=R, shard_size=10, progress=False)
    return result, images, labels, palette


def test_shard_writer_matches_tarfile_byte_for_byte(tmp_path):
    """The writer builds ustar headers itself (for speed); they must be exactly what tarfile writes."""
    rng = np.random.default_rng(0)
    samples = [("cat/img.v2", 3), ("dog/1", None), ("x" * 120, 7), ("chat/été", 12), ("plain", 0)]
    tokens = [rng.integers(0, 512, size=R * R).astype(np.uint16) for _ in samples]
    entries = []
    for name in ("a.tar", "b.tar"):
        writer = ShardWriter(tmp_path / name)
        for (key, label), row in zip(samples, tokens, strict=True):
            writer.add(key, row, label)
        entries.append(writer.close())
    assert entries[0] == {**entries[1], "tmp": "a.tar"}
    assert entries[0]["sha256"] == _sha(tmp_path / "a.tar")
    assert entries[0]["bytes"] == (tmp_path / "a.tar").stat().st_size

    with tarfile.open(tmp_path / "reference.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for (key, label), row in zip(samples, tokens, strict=True):
            name = key.replace(".", "%2E")
            members = [] if label is None else [(f"{name}.cls", str(label).encode())]
            saved = io.BytesIO()
            np.save(saved, row, allow_pickle=False)
            for member, data in [*members, (f"{name}.tokens.npy", saved.getvalue())]:
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "reference.tar").read_bytes()

    # The long and non-ASCII keys need pax headers, which the reader's fast path hands to tarfile.
    (tmp_path / "a").mkdir()
    (tmp_path / "a.tar").rename(tmp_path / "a" / "a.tar")
    read = list(read_shards(tmp_path / "a" / "a.tar"))
    assert [label for _, label in read] == [label for _, label in samples]
    for (row, _), expected in zip(read, tokens, strict=True):
        np.testing.assert_array_equal(row, expected)
        assert row.dtype == np.uint16 and row.flags.writeable


def test_reader_fast_path_reads_plain_shards_and_names_a_cut_one(tmp_path):
    tokens = np.arange(R * R, dtype=np.uint16)
    writer = ShardWriter(tmp_path / "plain.tar")
    for i in range(3):
        writer.add(f"k{i}", tokens + i, i)
    writer.close()
    rows = list(read_shards(tmp_path / "plain.tar"))
    assert [label for _, label in rows] == [0, 1, 2]
    np.testing.assert_array_equal(rows[2][0], tokens + 2)
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "plain.tar").read_bytes()[:1600])
    with pytest.raises(ShardError, match=r"cut.tar: not a readable tar \(member at byte 1024 is cut off"):
        list(read_shards(cut))


def test_tokenize_writes_contiguous_shards_manifest_and_meta(written):
    result, images, labels, palette = written
    out = result.out_dir
    assert result.counts == {"images": N, "written": N, "rejected": 0}
    names = [p.name for p in list_shards(out)]
    assert names == [f"train-{i:06d}.tar" for i in range(6)]
    manifest = read_manifest(out).to_pylist()
    assert [row["name"] for row in manifest] == names
    assert [row["samples"] for row in manifest] == [10, 10, 10, 10, 10, 3]
    for row in manifest:
        assert row["sha256"] == _sha(out / row["name"]) and row["bytes"] == (out / row["name"]).stat().st_size
    meta = read_meta(out)
    assert (meta["resolution"], meta["clusters"], meta["palette_digest"]) == (R, 32, palette.digest())
    assert meta["splits"]["train"]["counts"] == meta["counts"] == result.counts
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_tokens_round_trip_through_the_palette(written):
    result, images, labels, palette = written
    tokens, read_labels = load_tokens(result.out_dir)
    assert tokens.dtype == np.uint16 and tokens.shape == (N, R * R)
    np.testing.assert_array_equal(tokens, palette.quantize(images))
    np.testing.assert_array_equal(read_labels, labels)
    np.testing.assert_array_equal(palette.quantize(palette.dequantize(tokens)), tokens)
    limited, limited_labels = load_tokens(result.out_dir, "train", limit=7)
    assert limited.shape == (7, R * R) and limited_labels is not None and len(limited_labels) == 7


def test_same_inputs_give_byte_identical_folders(written, tmp_path):
    from igpt_core.sources import open_source

    result, images, labels, palette = written
    again = tokenize(
        open_source(images, labels), palette, tmp_path, resolution=R, shard_size=10, progress=False
    )
    assert not again.reused
    assert _folder_digests(tmp_path) == _folder_digests(result.out_dir)
    assert again.manifest_digest == result.manifest_digest


def test_ranks_partition_the_samples_evenly(written):
    result, *_ = written
    out = result.out_dir
    everything = [t.tobytes() for t, _ in read_shards(out)]
    for world_size, seed in [(3, None), (4, 7), (60, None)]:
        per_rank = samples_per_rank(out, world_size=world_size)
        assert per_rank == N // world_size
        seen: list[bytes] = []
        for rank in range(world_size):
            mine = [
                t.tobytes() for t, _ in read_shards(out, rank=rank, world_size=world_size, shuffle_seed=seed)
            ]
            assert len(mine) == per_rank
            seen += mine
        assert len(set(seen)) == len(seen) == per_rank * world_size
        assert set(seen) <= set(everything)


def test_shuffle_is_seeded_and_skip_resumes(written):
    result, *_ = written
    out = result.out_dir

    def order(**kwargs):
        return [t.tobytes() for t, _ in read_shards(out, **kwargs)]

    plain, first, again, other = order(), order(shuffle_seed=1), order(shuffle_seed=1), order(shuffle_seed=2)
    assert first == again and first != other and first != plain and sorted(first) == sorted(plain)
    pass_of_rank = order(rank=1, world_size=2, shuffle_seed=3)
    assert order(rank=1, world_size=2, shuffle_seed=3, skip=11) == pass_of_rank[11:]


def test_webdataset_reads_the_shards(written):
    import webdataset as wds

    result, images, labels, palette = written
    urls = [str(p) for p in list_shards(result.out_dir)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == N
    tokens = np.stack([np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False) for s in samples])
    np.testing.assert_array_equal(tokens, palette.quantize(images))
    assert [int(s["cls"]) for s in samples] == labels.tolist()


def test_rerun_reuses_and_mismatches_are_refused(written, tmp_path):
    from igpt_core.sources import open_source

    result, images, labels, palette = written
    out = tmp_path / "copy"
    out.mkdir()
    for path in result.out_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    source = open_source(images, labels)
    assert tokenize(source, palette, out, resolution=R, shard_size=10, progress=False).reused
    with pytest.raises(TokenizeError, match=rf"{out}: holds tokens at resolution {R}.*resolution 16"):
        tokenize(source, palette, out, resolution=16, shard_size=10, progress=False)
    with pytest.raises(TokenizeError, match="holds tokens of palette"):
        tokenize(source, _palette(seed=5), out, resolution=R, shard_size=10, progress=False)


def test_palette_too_large_for_uint16_is_named(tmp_path):
    path = tmp_path / "huge.npy"
    np.save(path, np.zeros((65536, 3), dtype=np.float32))
    images, labels = _images(2)
    with pytest.raises(TokenizeError, match=rf"{path}: K=65536 .*uint16"):
        tokenize(images, path, tmp_path / "out", resolution=R, progress=False)


def test_a_missing_source_is_named_and_creates_nothing(tmp_path):
    from igpt_core.sources import SourceError

    with pytest.raises(SourceError, match="no-such-images"):
        tokenize(str(tmp_path / "no-such-images"), _palette(), tmp_path / "out", resolution=R, progress=False)
    assert not (tmp_path / "out").exists()


def test_verify_names_the_changed_shard(written, tmp_path):
    result, *_ = written
    out = tmp_path / "copy"
    out.mkdir()
    for path in result.out_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    assert verify_shards(out) == 6
    shard = out / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # in the padding after the first label: the tar stays readable
    shard.write_bytes(bytes(data))
    assert len(list(read_shards(out))) == N  # unverified reading does not look
    with pytest.raises(ShardError, match="train-000002.tar: sha256 .* does not match the manifest"):
        list(read_shards(out, verify=True))
    with pytest.raises(ShardError, match="train-000002.tar"):
        verify_shards(out)


def test_bad_files_are_rejected_with_reasons_and_counted(tmp_path, ray_local):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for label in ("cat", "dog"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(R, R, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / label / f"{i}.png")
    (images / "cat" / "truncated.png").write_bytes((images / "cat" / "0.png").read_bytes()[:40])
    (images / "dog" / "garbage.jpg").write_bytes(b"not an image at all")
    (images / "dog" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    result = tokenize(str(images), _palette(), out, resolution=R, progress=False)
    assert result.counts == {"images": 11, "written": 8, "rejected": 3}
    rejected = {Path(r["key"]).name: r["reason"] for r in read_meta(out)["splits"]["train"]["rejects"]}
    assert set(rejected) == {"truncated", "garbage", "empty"}
    assert all(reason for reason in rejected.values())
    tokens, labels = load_tokens(out)
    assert tokens.shape == (8, R * R) and labels is not None and sorted(labels.tolist()) == [0] * 4 + [1] * 4

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(TokenizeError, match=r"only-bad: no image could be tokenized \(1 rejected; garbage: "):
        tokenize(str(only_bad), _palette(), tmp_path / "nothing", resolution=R, progress=False)
    assert not list((tmp_path / "nothing").iterdir())


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, size=(R, R, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _class_folder(root: Path, classes: tuple[str, ...], per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(10 * c + i))
    return root


def test_meta_records_the_class_names_of_the_source(tmp_path, ray_local):
    out = tmp_path / "tokens"
    train = tokenize(
        str(_class_folder(tmp_path / "train", ("cat", "dog"))), _palette(), out, resolution=R, progress=False
    )
    assert train.meta["label_names"] == ["cat", "dog"] == label_names(out) == label_names(out, "train")
    # a test split must number the same classes: one missing a class folder would shift every label
    with pytest.raises(
        TokenizeError, match=r"split 'train' names 2 classes \[cat, dog\], this source names 1 class \[dog\]"
    ):
        tokenize(
            str(_class_folder(tmp_path / "short", ("dog",))), _palette(), out, resolution=R, split="test"
        )
    tokenize(_images(3)[0], _palette(), out, resolution=R, split="test", progress=False)  # names none: fine
    assert label_names(out) == ["cat", "dog"] and label_names(out, "test") is None

    # a folder written before meta.json recorded names is redone, not reused without them
    meta = read_meta(out)
    del meta["splits"]["train"]["label_names"], meta["label_names"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert label_names(out) is None
    again = tokenize(str(tmp_path / "train"), _palette(), out, resolution=R, progress=False)
    assert not again.reused and label_names(out) == ["cat", "dog"]

    unnamed = tokenize(_images(3)[0], _palette(), tmp_path / "unnamed", resolution=R, progress=False)
    assert "label_names" not in unnamed.meta and label_names(tmp_path / "unnamed") is None

    # tars name their classes with a classes.txt beside them, which must cover every label
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "train-000000.tar", "w") as tar:
        for i, label in enumerate((0, 2, 1)):
            for name, data in ((f"s{i}.png", _png(i)), (f"s{i}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tars / "classes.txt").write_text("airplane\nautomobile\nbird\n")
    from_tars = tokenize(str(tars), _palette(), tmp_path / "from-tars", resolution=R, progress=False)
    assert label_names(from_tars.out_dir) == ["airplane", "automobile", "bird"]
    (tars / "classes.txt").write_text("airplane\nautomobile\n")
    with pytest.raises(
        TokenizeError, match=r"label 2, but the source names only 2 classes \[airplane, automobile\]"
    ):
        tokenize(str(tars), _palette(), tmp_path / "short-names", resolution=R, progress=False)
    assert not (tmp_path / "short-names" / "meta.json").exists()


def test_replacing_a_split_removes_its_stale_shards(tmp_path, ray_local):
    from igpt_core.sources import open_source

    palette = _palette()
    images, labels = _images(25)
    tokenize(open_source(images, labels), palette, tmp_path, resolution=R, shard_size=5, progress=False)
    test_images, _ = _images(4, seed=9)
    tokenize(test_images, palette, tmp_path, resolution=R, split="test", progress=False)
    assert len(list_shards(tmp_path, "train")) == 5
    smaller = tokenize(
        open_source(images[:7], labels[:7]), palette, tmp_path, resolution=R, shard_size=5, progress=False
    )
    assert [p.name for p in sorted(tmp_path.glob("train-*.tar"))] == ["train-000000.tar", "train-000001.tar"]
    assert smaller.meta["counts"]["written"] == 7 + 4
    assert load_tokens(tmp_path, "test")[1] is None
    with pytest.raises(TokenizeError, match="holds splits test, train; pass split="):
        list(read_shards(tmp_path))
    assert json.loads((tmp_path / "meta.json").read_text())["splits"].keys() == {"test", "train"}


class _FailingPalette(Palette):
    """Fails on any batch holding an all-white image: a task that dies after writing some shards."""

    def quantize(self, images: np.ndarray) -> np.ndarray:
        if (images.reshape(len(images), -1) == 255).all(axis=1).any():
            raise RuntimeError("injected failure")
        return super().quantize(images)


def test_a_failed_run_leaves_the_folder_as_it_was(written, tmp_path):
    import ray.cloudpickle

    from igpt_core.sources import open_source

    result, images, labels, palette = written
    out = tmp_path / "copy"
    out.mkdir()
    for path in result.out_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = _folder_digests(out)
    rng = np.random.default_rng(3)
    fresh = rng.integers(0, 255, size=(300, R, R, 3), dtype=np.uint8)
    fresh[280] = 255  # in the second quantize batch: the first batch's shards are written by then
    failing = _FailingPalette(centers=palette.centers)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            tokenize(open_source(fresh), failing, out, resolution=R, shard_size=50, progress=False)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert _folder_digests(out) == before


@pytest.mark.shared
def test_cifar_test_tar_tokenizes_completely(cifar_dir, tmp_path, ray_local):
    palette = _palette(clusters=64)
    result = tokenize(
        str(cifar_dir / "test-000000.tar"), palette, tmp_path, split="test", shard_size=4000, progress=False
    )
    assert result.counts == {"images": 10_000, "written": 10_000, "rejected": 0}
    assert [p.name for p in list_shards(tmp_path)] == [
        "test-000000.tar",
        "test-000001.tar",
        "test-000002.tar",
    ]
    tokens, labels = load_tokens(tmp_path, verify=True)
    assert tokens.shape == (10_000, 32 * 32) and int(tokens.max()) < 64
    assert labels is not None and np.bincount(labels).tolist() == [1000] * 10
    np.testing.assert_array_equal(palette.quantize(palette.dequantize(tokens[:100])), tokens[:100])

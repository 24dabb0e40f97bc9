"""Each rank reads only its share: bytes and samples per rank, every sample of an epoch once, exact resume
at world sizes 1, 2, 3 and 8 and across a changed world size, the old layout's states, prefetching.

The token folders here are written directly with `ShardWriter` (no palette, no Ray): sample i holds the
base-16 digits of i as its 16 tokens (4x4 images of 16 colours), so every sample names itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from igpt_core.data import TokenStream, _epoch_seed, read_shards, samples_per_rank
from igpt_core.prefetch import Prefetcher
from igpt_core.shard_reader import read_shard, read_shard_head, read_shard_rows
from igpt_core.shards import FORMAT, META_NAME, ShardError, ShardWriter
from igpt_core.shares import epoch_pieces, legacy_pieces

K, R = 16, 4
SIZES = [37, 50, 50, 12, 50, 50, 50, 3, 50, 41, 50, 50, 29, 50, 50, 50]  # uneven, a tiny one among them
WORLDS = (1, 2, 3, 8)


def _tokens(index: int) -> np.ndarray:
    return np.array([(index >> (4 * d)) & 15 for d in range(R * R)], dtype=np.uint16)


def _id(tokens: np.ndarray) -> int:
    return int(sum(int(t) << (4 * d) for d, t in enumerate(tokens)))


def write_folder(out: Path, sizes: list[int], labelled: bool = True) -> Path:
    """A token folder of `sizes` samples per shard (split train), numbered in shard order."""
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for number, size in enumerate(sizes):
        name = f"train-{number:06d}.tar"
        writer = ShardWriter(out / name)
        for _ in range(size):
            writer.add(f"s{index:07d}", _tokens(index), index % 10 if labelled else None)
            index += 1
        entry = writer.close()
        shards.append(
            {"name": name, **{key: entry[key] for key in ("samples", "bytes", "sha256", "sample_bytes")}}
        )
    meta = {
        "format": FORMAT,
        "resolution": R,
        "clusters": K,
        "palette_digest": hashlib.sha256(b"test").hexdigest(),
        "dtype": "uint16",
        "tokens_per_image": R * R,
        "splits": {"train": {"shards": shards, "counts": {"images": index, "written": index, "rejected": 0}}},
    }
    (out / META_NAME).write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("loader") / "tokens", SIZES)


def _stream(folder: Path, rank: int, world: int, seed: int = 5, **kwargs: Any) -> TokenStream:
    return TokenStream(folder, "train", rank=rank, world_size=world, seed=seed, **kwargs)


def _take(stream: TokenStream, n: int) -> list[int]:
    return [_id(t) for t in stream.next_batch(n)] if n else []


def _epoch_ids(folder: Path, world: int, rank: int, epoch: int, seed: int = 5) -> list[int]:
    """A rank's whole share of `epoch`, in order, read by a fresh stream."""
    stream = _stream(folder, rank, world, seed, epoch=epoch, prefetch=0)
    ids = []
    while True:
        tokens = stream.next_sample()
        if stream.epoch != epoch:
            return ids
        ids.append(_id(tokens))


# ------------------------------------------------------------------------------------ shares


@pytest.mark.parametrize("world", WORLDS)
def test_every_sample_of_an_epoch_is_taken_once_and_every_rank_takes_the_same_number(folder, world):
    total = sum(SIZES)
    per_rank = total // world
    for epoch in (0, 1):
        shares = [_epoch_ids(folder, world, rank, epoch) for rank in range(world)]
        assert [len(share) for share in shares] == [per_rank] * world  # equal steps, no rank runs dry
        taken = [i for share in shares for i in share]
        assert len(set(taken)) == len(taken) == per_rank * world  # none twice; only N % W wait
        assert set(taken) <= set(range(total))
    # epochs are reshuffled
    assert _epoch_ids(folder, world, 0, 0) != _epoch_ids(folder, world, 0, 1)


@pytest.mark.parametrize("world", (2, 3, 8))
def test_each_rank_reads_about_its_share_of_the_bytes_not_the_whole_split(folder, world):
    total_bytes = sum(p.stat().st_size for p in folder.glob("*.tar"))
    largest = max(p.stat().st_size for p in folder.glob("*.tar"))
    slack = 8 * 1024  # read_shard_head's guess reads a few blocks past the last sample wanted
    per_rank = sum(SIZES) // world
    reads = []
    for rank in range(world):
        stream = _stream(folder, rank, world, prefetch=0)
        stream.next_batch(per_rank)  # exactly this rank's epoch
        assert stream.epoch == 0 and stream.offset == per_rank
        reads.append(stream.bytes_read)
        assert stream.bytes_read <= total_bytes / world + largest + slack
    assert sum(reads) < total_bytes + world * (largest + slack)  # the old reader: world * total_bytes
    assert min(reads) >= 0.5 * total_bytes / world


def test_read_shards_splits_one_pass_as_the_stream_does_and_skips_without_reading(folder):
    world, total = 3, sum(SIZES)
    everything = [_id(t) for t, _ in read_shards(folder)]
    assert everything == list(range(total))  # unshuffled, world 1: shard order, file order
    for rank in range(world):
        mine = [_id(t) for t, _ in read_shards(folder, rank=rank, world_size=world, shuffle_seed=9)]
        assert len(mine) == samples_per_rank(folder, "train", world)
        assert [
            _id(t) for t, _ in read_shards(folder, rank=rank, world_size=world, shuffle_seed=9, skip=20)
        ] == mine[20:]


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("world", WORLDS)
def test_a_stream_resumed_mid_epoch_continues_with_exactly_the_samples_that_followed(folder, world):
    per_rank = sum(SIZES) // world
    batch = max(1, per_rank // 5)
    for rank in range(world):
        reference = _stream(folder, rank, world)
        ids = [_take(reference, batch) for _ in range(8)]  # past the end of epoch 0 at every world size
        saved = _stream(folder, rank, world)
        for expected in ids[:3]:
            assert _take(saved, batch) == expected
        state = saved.state_dict()
        saved.close()
        assert state["version"] == 2 and state["epoch"] == 0 and state["offset"] == 3 * batch
        resumed = _stream(folder, rank, world)
        resumed.load_state_dict(state)
        assert [_take(resumed, batch) for _ in range(5)] == ids[3:]
        reference.close()
        resumed.close()


@pytest.mark.parametrize(("old", "new"), [(2, 3), (3, 2), (8, 3), (1, 8)])
def test_a_changed_world_size_takes_exactly_the_samples_the_old_ranks_had_left(folder, old, new):
    per_rank = sum(SIZES) // old
    states, taken = [], set()
    for rank in range(old):
        stream = _stream(folder, rank, old, prefetch=0)
        taken |= set(_take(stream, per_rank // 3))
        states.append(stream.state_dict())
    remaining = {i for rank in range(old) for i in _epoch_ids(folder, old, rank, 0)} - taken
    got: list[int] = []
    counts = []
    for rank in range(new):
        stream = _stream(folder, rank, new, prefetch=0)
        stream.load_resharded(states, old)
        mine = []
        while True:
            tokens = stream.next_sample()
            if stream.epoch != 0:
                break
            mine.append(_id(tokens))
        counts.append(len(mine))
        got += mine
        # the next epoch is the new world's own layout
        assert [_id(tokens)] + _take(stream, 9) == _epoch_ids(folder, new, rank, 1)[:10]
    assert sorted(got) == sorted(remaining)  # exactly the rest: none lost, none twice
    assert max(counts) - min(counts) <= 1


def test_ranks_in_different_epochs_and_a_second_world_change_still_take_each_sample_once(folder):
    """Held-out samples skipped can put one rank an epoch ahead; a run resumed at 3 then again at 8."""
    per_rank = sum(SIZES) // 2
    first, second = _stream(folder, 0, 2, prefetch=0), _stream(folder, 1, 2, prefetch=0)
    _take(first, per_rank + 7)  # into epoch 1
    _take(second, per_rank - 4)  # four left in epoch 0
    states2 = [first.state_dict(), second.state_dict()]
    left = {
        0: set(_epoch_ids(folder, 2, 1, 0)[-4:]),
        1: set(_epoch_ids(folder, 2, 0, 1)[7:]) | set(_epoch_ids(folder, 2, 1, 1)),
    }

    by_epoch: dict[int, list[int]] = {0: [], 1: []}
    states3 = []
    for rank in range(3):
        stream = _stream(folder, rank, 3, prefetch=0)
        stream.load_resharded(states2, 2)
        for _ in range(5 + rank):  # a few each, then the run stops again
            tokens = stream.next_sample()
            by_epoch[stream.epoch].append(_id(tokens))  # the state after a sample is in its epoch
        states3.append(stream.state_dict())
        assert "reshard" in states3[-1]  # still inside the epochs the first resume covers
    for rank in range(8):
        stream = _stream(folder, rank, 8, prefetch=0)
        stream.load_resharded(states3, 3)
        while True:
            tokens = stream.next_sample()
            if stream.epoch >= 2:
                break
            by_epoch[stream.epoch].append(_id(tokens))
    for epoch in (0, 1):
        assert sorted(by_epoch[epoch]) == sorted(left[epoch])


def test_a_state_of_the_old_layout_resumes_in_it_until_its_epoch_ends(folder):
    """Checkpoints written before shard shares hold {"epoch", "offset"} of the i % world layout."""
    world, rank, offset = 2, 1, 30
    starts = np.cumsum([0, *SIZES])

    def old_share(world: int, rank: int) -> list[int]:
        pieces = legacy_pieces(SIZES, world, rank, _epoch_seed(5, 0))
        return [int(starts[shard] + row) for shard, rows in pieces for row in rows]

    assert len(old_share(world, rank)) == sum(SIZES) // world
    expected = old_share(world, rank)[offset:]
    stream = _stream(folder, rank, world)
    stream.load_state_dict({"epoch": 0, "offset": offset})
    assert stream.state_dict() == {"epoch": 0, "offset": offset}  # saved again in the format it came in
    assert _take(stream, len(expected)) == expected
    assert _take(stream, 5) == _epoch_ids(folder, world, rank, 1)[:5]
    assert stream.state_dict() == {"epoch": 1, "offset": 5, "version": 2}
    stream.close()
    # old-layout states of every rank, resumed at another world size: exactly the rest of the old epoch
    old_states = [{"epoch": 0, "offset": 10}, {"epoch": 0, "offset": 12}]
    left = old_share(2, 0)[10:] + old_share(2, 1)[12:]
    got = []
    for new_rank in range(3):
        stream = _stream(folder, new_rank, 3, prefetch=0)
        stream.load_resharded(old_states, 2)
        while True:
            tokens = stream.next_sample()
            if stream.epoch:
                break
            got.append(_id(tokens))
    assert sorted(got) == sorted(left)


def test_a_run_resumed_at_another_world_size_hands_the_stream_every_old_position(tmp_path, caplog):
    """The checkpointer's side: a real one-rank run's checkpoint, loaded by rank 1 of 2."""
    from test_loop import MODEL, FolderRuntime, _run, _train

    from igpt_core.checkpoint import read_trainer_state
    from igpt_core.checkpointer import Checkpointer, Progress
    from igpt_core.model import ImageGPT

    tokens = write_folder(tmp_path / "tokens", [30, 30, 20])
    held = np.stack([_tokens(i) for i in range(4)])
    with TokenStream(tokens, "train", rank=0, world_size=1, seed=0) as stream:
        _run(FolderRuntime(tmp_path / "run"), _train(steps=6), held, stream=stream)
    saved = read_trainer_state(tmp_path / "run" / "checkpoint-00000006")
    assert saved["data"] == [{"epoch": 0, "offset": 24, "version": 2}]  # 6 steps of 4 samples
    model = ImageGPT(MODEL)
    stream = TokenStream(tokens, "train", rank=1, world_size=2, seed=0, prefetch=0)
    checkpointer = Checkpointer(
        FolderRuntime(tmp_path / "run", rank=1, world_size=2),
        train=_train(steps=8, workers=2),
        model_config=MODEL,
        palette=None,
        palette_digest=None,
        shards=str(tokens),
    )
    with caplog.at_level(logging.WARNING):
        start = checkpointer.load(
            model=model, optimizer=model.configure_optimizer(0.01, 1e-3), stream=stream, progress=Progress()
        )
    assert start == 6
    assert stream.state_dict()["reshard"] == {"world_size": 1, "positions": saved["data"]}
    rest = _epoch_ids(tokens, 1, 0, 0, seed=0)[24:]
    assert [_id(t) for t in stream.next_batch(len(rest) - len(rest) // 2)] == rest[len(rest) // 2 :]
    assert "the rest of the data epoch is split among them" in caplog.text


# ------------------------------------------------------------------------------------ reading


def test_read_shard_head_reads_only_as_far_as_the_samples_wanted(folder):
    shard = folder / "train-000001.tar"
    size = shard.stat().st_size
    whole = read_shard(shard)
    head, read = read_shard_head(shard, 10, size=size, samples=50)
    assert head == whole[:10] and read < size / 2
    # a guess that falls short (a shard claimed 50x bigger in samples) reads on until the samples are whole
    short, read_short = read_shard_head(shard, 40, size=size, samples=2_500)
    assert short == whole[:40] and read_short <= size
    everything, read_all = read_shard_head(shard, 50, size=size, samples=50)
    assert everything == whole and read_all == size


def test_rows_of_a_shard_of_equal_samples_are_read_alone_at_their_offsets(folder):
    """What a rank's part of a shard cut between two ranks costs: only its rows' bytes."""
    shard = folder / "train-000001.tar"
    entry = json.loads((folder / META_NAME).read_text())["splits"]["train"]["shards"][1]
    stride = entry["sample_bytes"]
    assert stride == 4 * 512  # a .cls and a .tokens.npy member: a header block and a data block each
    whole = read_shard(shard)
    rows = [40, 3, 17, 49]
    picked, read = read_shard_rows(shard, rows, size=entry["bytes"], samples=50, sample_bytes=stride)
    assert picked == [whole[row] for row in rows] and read == len(rows) * stride
    # every row up to the last asked for: one read from the start, as without sample_bytes
    head, head_read = read_shard_rows(shard, [2, 0, 1], size=entry["bytes"], samples=50, sample_bytes=stride)
    assert head == [whole[2], whole[0], whole[1]] and head_read >= 3 * stride


def test_a_shard_that_does_not_match_its_sample_bytes_is_refused_naming_it(folder, tmp_path):
    shard = folder / "train-000001.tar"
    with pytest.raises(
        ShardError, match=r"train-000001\.tar: its samples are not each 2304 bytes .*rerun tokenize"
    ):
        read_shard_rows(shard, [7, 9], sample_bytes=4 * 512 + 256)  # a stride that is not the shard's
    with pytest.raises(
        ShardError, match=r"train-000001\.tar: 2 rows of 4096 bytes hold 4 samples, not one each"
    ):
        read_shard_rows(shard, [1, 5], sample_bytes=2 * 4 * 512)


def test_the_writer_records_sample_bytes_only_when_every_sample_has_that_length(tmp_path):
    uniform = ShardWriter(tmp_path / "a.tar")
    for index in range(5):
        uniform.add(f"k{index}", _tokens(index), index)
    assert uniform.close()["sample_bytes"] == 4 * 512
    mixed = ShardWriter(tmp_path / "b.tar")
    mixed.add("k0", _tokens(0), 1)
    mixed.add("k1", _tokens(1), None)  # no .cls member: a shorter sample
    assert mixed.close()["sample_bytes"] is None
    empty = ShardWriter(tmp_path / "c.tar")
    assert empty.close()["sample_bytes"] is None


def test_read_shard_head_falls_back_to_a_whole_read_for_tars_it_does_not_parse(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(6):
            buffer = io.BytesIO()
            np.save(buffer, _tokens(index), allow_pickle=False)
            info = tarfile.TarInfo(f"{'long-key-' * 12}{index}.tokens.npy")  # > 100 bytes: a pax header
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    rows, read = read_shard_head(path, 2, size=path.stat().st_size, samples=6)
    assert [r[0] for r in rows] == [r[0] for r in read_shard(path)[:2]]
    assert read == path.stat().st_size


def test_a_shard_that_vanished_is_an_error_raised_in_the_consumer_not_a_hang(tmp_path):
    out = write_folder(tmp_path / "t", [20, 20, 20])
    stream = TokenStream(out, "train", rank=0, world_size=1, seed=0, prefetch=2)
    (out / "train-000000.tar").unlink()
    (out / "train-000001.tar").unlink()
    (out / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match="cannot read shard"):
        stream.next_batch(4)
    stream.close()


# ------------------------------------------------------------------------------------ prefetch


def test_prefetched_batches_are_the_batches_a_plain_loop_gives_with_the_same_states(folder):
    plain = _stream(folder, 1, 3, prefetch=0)
    ahead = _stream(folder, 1, 3, prefetch=3)
    sizes = [7] * 12 + [5] * 6 + [7] * 4  # a batch size change restarts the thread at the position
    for size in sizes:
        a, b = plain.next_labelled_batch(size), ahead.next_labelled_batch(size)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert plain.state_dict() == ahead.state_dict()
    ahead.close()
    assert ahead._prefetcher is None


def test_prefetcher_keeps_order_stays_bounded_propagates_errors_and_stops():
    made = []
    lock = threading.Lock()

    def make() -> int:
        with lock:
            made.append(len(made))
            return made[-1]

    prefetcher = Prefetcher(make, depth=2)
    got = [prefetcher.get() for _ in range(20)]
    assert got == list(range(20))
    prefetcher.close()
    assert not prefetcher.alive
    assert len(made) <= 20 + 2 + 1  # at most depth waiting and one in progress when it stopped
    with pytest.raises(RuntimeError, match="after close"):
        prefetcher.get()

    def failing() -> int:
        value = make()
        if value >= 25:
            raise OSError(f"disk gone at {value}")
        return value

    made.clear()
    broken = Prefetcher(failing, depth=3)
    assert [broken.get() for _ in range(25)] == list(range(25))
    with pytest.raises(OSError, match="disk gone at 25"):
        broken.get()
    assert not broken.alive


def test_close_stops_a_producer_blocked_on_a_full_queue():
    prefetcher = Prefetcher(lambda: 1, depth=1)
    assert prefetcher.get() == 1  # the producer then fills the queue and blocks on the next put
    prefetcher.close()
    assert not prefetcher.alive


def test_epoch_pieces_cut_at_most_one_shard_between_neighbours():
    counts = SIZES
    for world in (2, 3, 8, 64):
        seen_cuts = 0
        for rank in range(world):
            pieces = epoch_pieces(counts, world, rank, shuffle_seed=3)
            partial = [shard for shard, rows in pieces if len(rows) != counts[shard]]
            assert len(partial) <= 2  # a tail where the range starts, a head where it ends
            seen_cuts += len(partial)
        assert seen_cuts <= 2 * (world - 1) + 1

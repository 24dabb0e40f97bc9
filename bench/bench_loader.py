"""Per-rank loader throughput and bytes read at world sizes 1, 2, 8 and 64, before and after shard shares.

Ranks are simulated one after another in this process over the same token folder: a synthetic split of
`--shards` shards of 0.5x to 1.5x `--shard-size` samples (seeded; R=32, K=512 random tokens, labelled,
written by igpt's own `ShardWriter`; default 128 shards of 125 to 375, about 32,000 samples, 125 MiB) in
a temporary folder. Uneven shards make ranks' ranges cut shards, as real splits do. Each rank reads one
whole epoch of its share, in batches of 64, through

- after: `TokenStream` (prefetch off, so the figure is the reading itself), the shard-share layout;
- before: the reader this project had until this change, kept here verbatim in `_read_shards_before`:
  every rank reads and parses every shard and keeps sample i when i % world == rank.

The files sit in the page cache after the first pass, so samples/s is the CPU cost of reading, parsing
and decoding; bytes read is what a rank would pull over the network from shared storage. Each world size
is measured in `--repeats` rounds over all world sizes (all its ranks each time, so every world size sees
the same load) and the best round kept, in wall time and in CPU time ("before" is repeated at world 1
only; at world 64 it is measured on 4 ranks, each reading the whole split; "after" on all 64 ranks).

Then the prefetch thread: the time a step waits for its batch, with a stand-in step (a float32 matrix
product, which releases the GIL like a torch step) of about the batch's decode time, prefetch 0 vs 2.

    .venv/bin/python bench/bench_loader.py [--shards 128] [--shard-size 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from igpt_core.data import TokenStream, _epoch_seed, samples_per_rank  # noqa: E402
from igpt_core.shard_reader import decode_sample, read_shard  # noqa: E402
from igpt_core.shards import FORMAT, META_NAME, ShardWriter, shard_entries  # noqa: E402

R, K, BATCH, SEED = 32, 512, 64, 0
WORLDS = (1, 2, 8, 64)


def write_synthetic(out: Path, shards: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for number in range(shards):
        name = f"train-{number:06d}.tar"
        writer = ShardWriter(out / name)
        size = int(rng.integers(shard_size // 2, shard_size * 3 // 2 + 1))  # uneven, so ranks cut shards
        tokens = rng.integers(0, K, size=(size, R * R), dtype=np.uint16)
        for index, row in enumerate(tokens):
            writer.add(f"{number:06d}_{index:06d}", row, int(index % 10))
        entry = writer.close()
        entries.append(
            {"name": name, **{k: entry[k] for k in ("samples", "bytes", "sha256", "sample_bytes")}}
        )
    meta = {
        "format": FORMAT,
        "resolution": R,
        "clusters": K,
        "palette_digest": hashlib.sha256(b"synthetic").hexdigest(),
        "dtype": "uint16",
        "tokens_per_image": R * R,
        "splits": {"train": {"shards": entries}},
    }
    (out / META_NAME).write_text(json.dumps(meta))


def _read_shards_before(
    path: Path, *, split: str, rank: int, world_size: int, shuffle_seed: int | None, counter: list[int]
) -> Iterator[tuple[np.ndarray, int | None]]:
    """The reader before this change (igpt_core.data.read_shards at 8cacd58), counting the bytes read."""
    entries = shard_entries(path, split)
    per_rank = sum(entry["samples"] for entry in entries) // world_size
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    order = rng.permutation(len(entries)) if rng is not None else np.arange(len(entries))
    position = 0
    mine = 0
    for shard_index in order:
        if mine >= per_rank:
            return
        entry = entries[int(shard_index)]
        count = entry["samples"]
        here = len(range(position + (rank - position) % world_size, position + count, world_size))
        if here == 0:
            position += count
            continue
        samples = read_shard(entry["path"], entry["sha256"])
        counter[0] += entry["bytes"]
        within = (
            np.random.default_rng([shuffle_seed, int(shard_index)]).permutation(len(samples))
            if shuffle_seed is not None
            else range(len(samples))
        )
        for sample_index in within:
            index = position
            position += 1
            if index % world_size != rank or mine >= per_rank:
                continue
            mine += 1
            yield decode_sample(entry["path"], *samples[int(sample_index)])


def rank_before(folder: Path, rank: int, world: int) -> tuple[float, float, int, int]:
    """(seconds, CPU seconds, bytes, samples) of one rank's epoch through the old reader, batches of BATCH."""
    counter = [0]
    start, cpu = time.perf_counter(), time.process_time()
    samples = _read_shards_before(
        folder, split="train", rank=rank, world_size=world, shuffle_seed=_epoch_seed(SEED, 0), counter=counter
    )
    taken = 0
    while True:
        batch = [
            tokens for tokens, _ in (next(samples, (None, None)) for _ in range(BATCH)) if tokens is not None
        ]
        if not batch:
            break
        np.stack(batch)
        taken += len(batch)
    return time.perf_counter() - start, time.process_time() - cpu, counter[0], taken


def rank_after(folder: Path, rank: int, world: int) -> tuple[float, float, int, int]:
    """(seconds, CPU seconds, bytes, samples) of one rank's epoch through TokenStream (prefetch off)."""
    per_rank = samples_per_rank(folder, "train", world)
    stream = TokenStream(folder, "train", rank=rank, world_size=world, seed=SEED, prefetch=0)  # once a run
    start, cpu = time.perf_counter(), time.process_time()
    taken = 0
    while taken < per_rank:
        taken += len(stream.next_batch(min(BATCH, per_rank - taken)))
    assert stream.epoch == 0 and stream.offset == per_rank
    return time.perf_counter() - start, time.process_time() - cpu, stream.bytes_read, taken


def measure(folder: Path, world: int, ranks: list[int], side: Any) -> dict[str, float]:
    """Every rank in `ranks` reads its epoch once: per-rank samples/s (wall and per CPU-second) and
    bytes per rank."""
    seconds = cpu = total_bytes = samples = 0.0
    for rank in ranks:
        s, c, b, n = side(folder, rank, world)
        seconds, cpu, total_bytes, samples = seconds + s, cpu + c, total_bytes + b, samples + n
    return {
        "ranks": len(ranks),
        "samples_per_rank": samples / len(ranks),
        "bytes_per_rank": total_bytes / len(ranks),
        "per_rank_rate": samples / seconds,  # samples/s of one rank reading its epoch
        "per_cpu_s": samples / cpu,
    }


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The best repetition of each rate (the machine is shared: other work only ever slows one down)."""
    kept = dict(runs[0])
    kept["per_rank_rate"] = max(run["per_rank_rate"] for run in runs)
    kept["per_cpu_s"] = max(run["per_cpu_s"] for run in runs)
    return kept


def prefetch_wait(folder: Path, steps: int = 60) -> dict[int, float]:
    """Mean seconds a step waits on next_batch, with a GIL-releasing stand-in step, prefetch 0 vs 2."""
    a = np.random.default_rng(0).standard_normal((384, 384), dtype=np.float32)
    step_start = time.perf_counter()
    for _ in range(8):
        a @ a
    step = (time.perf_counter() - step_start) / 8
    waits: dict[int, float] = {}
    for depth in (0, 2):
        with TokenStream(folder, "train", rank=0, world_size=1, seed=SEED, prefetch=depth) as stream:
            stream.next_batch(BATCH)  # start-up (and the thread's first batch) not counted
            waited = 0.0
            for _ in range(steps):
                start = time.perf_counter()
                stream.next_batch(BATCH)
                waited += time.perf_counter() - start
                for _ in range(3):
                    a @ a
        waits[depth] = waited / steps
    waits[-1] = 3 * step
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=250, help="mean samples per shard (0.5x to 1.5x)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per world size; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="igpt-bench-loader-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        write_synthetic(folder, args.shards, args.shard_size)
        total = sum(p.stat().st_size for p in folder.glob("*.tar"))
        samples = samples_per_rank(folder, "train", 1)
        print(
            f"synthetic split: {args.shards} shards x {args.shard_size} samples = {samples:,} "
            f"({total / 2**20:,.0f} MiB), written in {time.perf_counter() - start:.1f} s; "
            f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs",
            flush=True,
        )
        rank_after(folder, 0, 1)  # warm the page cache and the npy header cache
        befores: dict[int, list[dict[str, float]]] = {world: [] for world in WORLDS}
        afters: dict[int, list[dict[str, float]]] = {world: [] for world in WORLDS}
        for repeat in range(args.repeats):  # rounds over every world size, so each sees the same load
            for world in WORLDS:
                every = list(range(world))
                if repeat == 0 or world == 1:
                    some = every if world <= 8 else [0, 21, 42, 63]
                    befores[world].append(measure(folder, world, some, rank_before))
                afters[world].append(measure(folder, world, every, rank_after))
                print(
                    f"round {repeat} world {world}: before {befores[world][-1]}  after {afters[world][-1]}",
                    flush=True,
                )
        rows = [(world, best(befores[world]), best(afters[world])) for world in WORLDS]
        waits = prefetch_wait(folder)
        load = os.getloadavg()[0]

    base_before, base_after = rows[0][1]["per_rank_rate"], rows[0][2]["per_rank_rate"]
    cpu_after = rows[0][2]["per_cpu_s"]
    print()
    print(
        f"Per rank, one epoch of a {samples:,}-sample split ({args.shards} shards, {total / 2**20:,.0f} MiB), "
        f"batches of {BATCH}; load average {load:.1f} at the end:"
    )
    print()
    print(
        "| world | samples per rank | MiB read per rank, before | after | share of the split read, after "
        "| samples/s per rank, before | after | after / before | after vs world 1 | per CPU-s, before | after "
        "| after vs world 1 (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for world, before, after in rows:
        print(
            f"| {world} | {after['samples_per_rank']:,.0f} | {before['bytes_per_rank'] / 2**20:,.1f} | "
            f"{after['bytes_per_rank'] / 2**20:,.1f} | {after['bytes_per_rank'] / total:.1%} "
            f"(1/{world} = {1 / world:.1%}) | {before['per_rank_rate']:,.0f} | {after['per_rank_rate']:,.0f} | "
            f"{after['per_rank_rate'] / before['per_rank_rate']:.1f}x | "
            f"{after['per_rank_rate'] / base_after:.2f} (before: {before['per_rank_rate'] / base_before:.2f}) | "
            f"{before['per_cpu_s']:,.0f} | {after['per_cpu_s']:,.0f} | {after['per_cpu_s'] / cpu_after:.2f} |"
        )
    print()
    print(
        f"prefetch: a step of {waits[-1] * 1e3:.1f} ms (stand-in) waited {waits[0] * 1e3:.2f} ms per batch "
        f"for its {BATCH} samples without prefetch, {waits[2] * 1e3:.2f} ms with prefetch=2"
    )
    ratio, cpu_ratio = rows[-1][2]["per_rank_rate"] / base_after, rows[-1][2]["per_cpu_s"] / cpu_after
    print(
        f"target: per-rank samples/s at world 64 within 20% of world 1: {ratio:.2f} wall "
        f"({'met' if ratio >= 0.8 else 'NOT met'}), {cpu_ratio:.2f} per CPU-second "
        f"({'met' if cpu_ratio >= 0.8 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()

"""Tokenize: quantize a source with a palette into a token folder of webdataset shards (see `shards`).

Writing: one Ray task per source part quantizes that part and writes its samples, in input order, into
shards of at most `shard_size` samples under temporary names (`shards.ShardWriter`: fixed tar headers, so
the same inputs give byte-identical shards). When every task has finished, the driver publishes them: it
renames them, in (part, chunk) order, to `<split>-000000.tar`, `<split>-000001.tar`, ... and then writes
manifest.parquet and meta.json atomically (meta.json last, since readers trust it). So the output depends
on the inputs only, not on scheduling; memory stays bounded by one quantize batch per task; and writing
runs in parallel (measured: under 5% of task time, so shipping tokens to the driver would gain nothing).

Reading a folder back is `shards` (index), `shard_reader` (one shard) and `data.read_shards` (each rank's
share).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_core.config import TokenizeConfig
from igpt_core.distributed import ensure_ray, map_parts
from igpt_core.palette import Palette
from igpt_core.palette_table import TABLE_NAME
from igpt_core.shards import (
    FORMAT,
    MANIFEST_NAME,
    META_NAME,
    ShardWriter,
    TokenizeError,
    check_label_names,
    read_meta,
    shown_classes,
)
from igpt_core.sources import Reject, Sample, Source, open_source, read_part
from igpt_core.storage import check_shared_storage

if TYPE_CHECKING:
    from igpt_core.sources import SourcePart

MAX_CLUSTERS = int(np.iinfo(np.uint16).max)  # 65535: the largest K whose tokens fit uint16
_QUANTIZE_BATCH = 256  # images per palette.quantize call: bounds the distance-table memory of a task
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class TokenizeResult:
    out_dir: Path
    meta: dict[str, Any]
    """The folder's meta.json after this run (every split in the folder)."""
    manifest_digest: str
    """sha256 over the manifest rows (name, samples, bytes, sha256 of every shard in the folder)."""
    split: str = "train"
    reused: bool = False
    """True when the folder already held this split from the same source, palette and settings."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Summed over tasks: read (decode + resize), quantize, write (wall time in each) and cpu (process time);
    and wall for the whole call."""

    @property
    def counts(self) -> dict[str, int]:
        """images, written, rejected for this run's split."""
        return dict(self.meta["splits"][self.split]["counts"])

    @property
    def rejects(self) -> list[dict[str, str]]:
        return list(self.meta["splits"][self.split]["rejects"])


def _tokenize_part(
    item: tuple[int, SourcePart],
    *,
    palette: Palette,
    resolution: int,
    out_dir: str,
    shard_size: int,
    run_id: str,
) -> dict[str, Any]:
    """One Ray task: read, quantize and write one source part; returns counts, rejects and its shards."""
    index, part = item
    shards: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    seconds = {"read": 0.0, "quantize": 0.0, "write": 0.0}
    cpu = time.process_time()
    seen: set[str] = set()
    writer: ShardWriter | None = None
    batch: list[Any] = []
    images = 0

    def flush() -> None:
        nonlocal writer
        if not batch:
            return
        start = time.perf_counter()
        tokens = palette.quantize(np.stack([sample.image for sample in batch]))
        seconds["quantize"] += time.perf_counter() - start
        start = time.perf_counter()
        for sample, row in zip(batch, tokens, strict=True):
            if writer is None:
                chunk = len(shards)
                writer = ShardWriter(Path(out_dir) / f"{_TMP_PREFIX}{run_id}-{index:06d}-{chunk:04d}.tar")
            writer.add(sample.key, np.ascontiguousarray(row, dtype=np.uint16), sample.label)
            if writer.samples == shard_size:
                shards.append(writer.close())
                writer = None
        seconds["write"] += time.perf_counter() - start
        batch.clear()

    max_label = -1
    try:
        records = iter(read_part(part, resolution))
        while True:
            start = time.perf_counter()
            record = next(records, None)
            seconds["read"] += time.perf_counter() - start
            if record is None:
                break
            images += 1
            problem = sample_problem(record, resolution)
            if problem is None and record.key in seen:
                problem = "duplicate key within its part"
            if problem is not None:
                rejects.append({"key": record.key, "reason": problem})
            else:
                assert isinstance(record, Sample)
                seen.add(record.key)
                if record.label is not None:
                    max_label = max(max_label, record.label)
                batch.append(record)
                if len(batch) == _QUANTIZE_BATCH:
                    flush()
        flush()
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    seconds["cpu"] = time.process_time() - cpu
    written = sum(shard["samples"] for shard in shards)
    return {
        "images": images,
        "written": written,
        "rejects": rejects,
        "shards": shards,
        "seconds": seconds,
        "max_label": max_label,
    }


def sample_problem(record: Sample | Reject, resolution: int) -> str | None:
    """Why a read record cannot become tokens (its reject reason, an empty key, a wrong image), or None."""
    if isinstance(record, Reject):
        return record.reason
    if not record.key:
        return "empty key"
    shape = (resolution, resolution, 3)
    if record.image.shape != shape or record.image.dtype != np.uint8:
        return f"decoded to {record.image.dtype} {record.image.shape}, expected uint8 {shape}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _manifest_rows(meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [dict(shard, split=name) for name, entry in meta["splits"].items() for shard in entry["shards"]]
    return sorted(rows, key=lambda row: row["name"])


def _manifest_digest(meta: dict[str, Any]) -> str:
    text = "".join(
        f"{row['name']}\t{row['samples']}\t{row['bytes']}\t{row['sha256']}\n" for row in _manifest_rows(meta)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _write_folder_index(out_dir: Path, meta: dict[str, Any]) -> None:
    """Writes manifest.parquet, then meta.json (readers trust meta.json, so it goes last)."""
    import pyarrow as pa  # heavy: pyarrow
    import pyarrow.parquet as pq  # heavy: pyarrow

    rows = _manifest_rows(meta)
    table = pa.table(
        {
            "name": pa.array([row["name"] for row in rows], pa.string()),
            "split": pa.array([row["split"] for row in rows], pa.string()),
            "samples": pa.array([row["samples"] for row in rows], pa.int64()),
            "bytes": pa.array([row["bytes"] for row in rows], pa.int64()),
            "sha256": pa.array([row["sha256"] for row in rows], pa.string()),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _write_atomic(out_dir / MANIFEST_NAME, sink.getvalue())
    _write_atomic(out_dir / META_NAME, _meta_bytes(meta))


def _load_palette(path: str | Path) -> Palette:
    """Palette.load, after checking from the .npy header alone that K fits uint16 tokens."""
    npy = Path(path) / "palette.npy" if Path(path).is_dir() else Path(path)
    if npy.is_file():
        try:
            clusters = np.load(npy, mmap_mode="r", allow_pickle=False).shape[0]
        except (ValueError, IndexError):
            clusters = 0  # not a plain array: Palette.load says what is wrong with it
        if clusters > MAX_CLUSTERS:
            raise TokenizeError(
                f"{path}: K={clusters} colours do not fit uint16 tokens (at most {MAX_CLUSTERS}); "
                "fit a palette with fewer clusters"
            )
    return Palette.load(path)


def _store_table(loaded: Palette, given: Palette | str | Path) -> None:
    """Builds a palette folder's colour table once and stores it there (palette.lut), so each task
    memory-maps it rather than computing every colour it meets."""
    if loaded.has_table or isinstance(given, Palette) or not Path(given).is_dir():
        return
    # A read-only palette folder: each task fills its colour cache as before.
    with contextlib.suppress(OSError):
        loaded.save_table(Path(given) / TABLE_NAME)


def _palette_name(palette: Palette | str | Path) -> str:
    return str(palette) if isinstance(palette, str | Path) else f"palette {palette.digest()[:12]}"


def _check_folder(out_dir: Path, existing: dict[str, Any], resolution: int, palette: Palette) -> None:
    """A folder holds one resolution and one palette: tokens of two palettes cannot be mixed in training."""
    if existing.get("format") != FORMAT:
        raise TokenizeError(
            f"{out_dir / META_NAME}: not an igpt token folder (format {existing.get('format')!r})"
        )
    if existing["resolution"] != resolution:
        raise TokenizeError(
            f"{out_dir}: holds tokens at resolution {existing['resolution']} (meta.json), this run asks for "
            f"resolution {resolution}; write to another folder or use --resolution {existing['resolution']}"
        )
    if existing["palette_digest"] != palette.digest():
        raise TokenizeError(
            f"{out_dir}: holds tokens of palette {existing['palette_digest'][:12]} (K={existing['clusters']}), "
            f"this run uses palette {palette.digest()[:12]} (K={palette.clusters}); write to another folder"
        )


def _reusable(
    out_dir: Path, entry: dict[str, Any] | None, source_digest: str, shard_size: int, names: list[str] | None
) -> bool:
    if entry is None or entry["source_digest"] != source_digest or entry["shard_size"] != shard_size:
        return False
    if entry.get("label_names") != names:  # a folder written before meta.json recorded class names
        return False
    return all(
        (out_dir / shard["name"]).is_file() and (out_dir / shard["name"]).stat().st_size == shard["bytes"]
        for shard in entry["shards"]
    )


def tokenize(
    source: str | os.PathLike[str] | np.ndarray | Source,
    palette: Palette | str | Path,
    out_dir: str | os.PathLike[str],
    *,
    resolution: int = 32,
    split: str = "train",
    shard_size: int = 10_000,
    ray_address: str | None = None,
    progress: bool = True,
) -> TokenizeResult:
    """Quantizes every image of `source` (a spec for `open_source`, or a Source) and writes `split` shards.

    Every input image is written or listed in meta.json's rejects with its reason. Rerunning with the same
    source, palette and settings finds the shards in place and does no work (`reused`); a different source
    replaces the split's shards. A failed run leaves the folder as it was. One tokenize at a time per
    folder: a run removes the temporary files that interrupted runs left. Raises TokenizeError for a
    palette whose K does not fit uint16 and for a folder that holds another resolution or palette.
    """
    wall = time.perf_counter()
    config = TokenizeConfig(resolution=resolution, split=split, shard_size=shard_size)
    loaded = palette if isinstance(palette, Palette) else _load_palette(palette)
    if loaded.clusters > MAX_CLUSTERS:
        raise TokenizeError(
            f"{_palette_name(palette)}: K={loaded.clusters} colours do not fit uint16 tokens "
            f"(at most {MAX_CLUSTERS}); fit a palette with fewer clusters"
        )
    opened = source if isinstance(source, Source) else open_source(source)  # no decoding yet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{_TMP_PREFIX}*"):  # from an interrupted run: never under a final name
        leftover.unlink(missing_ok=True)
    existing = read_meta(out) if (out / META_NAME).exists() else None
    if existing is not None:
        _check_folder(out, existing, config.resolution, loaded)

    names = list(opened.classes) if opened.classes else None
    check_label_names(out, existing, config.split, names)
    source_digest = opened.digest()
    previous = existing["splits"].get(config.split) if existing else None
    if existing is not None and _reusable(out, previous, source_digest, config.shard_size, names):
        return TokenizeResult(out, existing, _manifest_digest(existing), config.split, reused=True)

    _store_table(loaded, palette)
    parts = opened.parts()
    run_id = uuid.uuid4().hex[:12]
    out_name = str(out)

    # A closure rather than functools.partial: ray.remote takes plain functions only.
    def task(item: tuple[int, SourcePart]) -> dict[str, Any]:
        return _tokenize_part(
            item,
            palette=loaded,
            resolution=config.resolution,
            out_dir=out_name,
            shard_size=config.shard_size,
            run_id=run_id,
        )

    try:
        ensure_ray(ray_address)
        # Tasks on other nodes write their shards straight into `out`: refuse a node-local folder up front.
        check_shared_storage(out, ray_address)
        results = map_parts(task, list(enumerate(parts)), desc=f"tokenize {config.split}", progress=progress)
        meta = _publish(out, existing, results, config, loaded, opened.spec, source_digest, names)
    finally:
        for leftover in out.glob(f"{_TMP_PREFIX}{run_id}-*"):
            leftover.unlink(missing_ok=True)
    seconds = {key: sum(r["seconds"][key] for r in results) for key in ("read", "quantize", "write", "cpu")}
    seconds["wall"] = time.perf_counter() - wall
    return TokenizeResult(out, meta, _manifest_digest(meta), config.split, seconds=seconds)


def _publish(
    out: Path,
    existing: dict[str, Any] | None,
    results: list[dict[str, Any]],
    config: TokenizeConfig,
    palette: Palette,
    spec: str,
    source_digest: str,
    names: list[str] | None,
) -> dict[str, Any]:
    """Renames the tasks' shards to their final names in input order and writes manifest and meta."""
    rejects = [reject for result in results for reject in result["rejects"]]
    images = sum(result["images"] for result in results)
    written = sum(result["written"] for result in results)
    if images != written + len(rejects):  # a bug, not bad input: every image must be accounted for
        raise RuntimeError(
            f"tokenize {spec}: {images} images but {written} written + {len(rejects)} rejected"
        )
    if written == 0:
        examples = "; ".join(f"{r['key']}: {r['reason']}" for r in rejects[:3]) or "it yielded no images"
        raise TokenizeError(f"{spec}: no image could be tokenized ({len(rejects)} rejected; {examples})")
    max_label = max(result["max_label"] for result in results)
    if names is not None and max_label >= len(names):
        raise TokenizeError(
            f"{spec}: a sample has label {max_label}, but the source names only {shown_classes(names)}; "
            "its classes.txt (or ClassLabel names) must list every label"
        )
    temporary = [shard for result in results for shard in result["shards"]]
    missing = [shard["tmp"] for shard in temporary if not (out / shard["tmp"]).is_file()]
    if missing:
        raise TokenizeError(
            f"{out}: {len(missing)} shard(s) written by Ray tasks are not visible here (e.g. {missing[0]}); "
            "on a multi-node cluster the output folder must be on storage every node shares"
        )

    meta = existing or {
        "format": FORMAT,
        "resolution": config.resolution,
        "clusters": palette.clusters,
        "palette_digest": palette.digest(),
        "dtype": "uint16",
        "tokens_per_image": config.resolution**2,
        "splits": {},
    }
    if config.split in meta["splits"]:
        # Drop the split from the index before its shards change, so a crash mid-way leaves a folder that
        # says the split is missing rather than one whose manifest disagrees with its shards.
        del meta["splits"][config.split]
        _write_folder_index(out, meta)

    shards = []
    for number, shard in enumerate(temporary):
        name = f"{config.split}-{number:06d}.tar"
        os.replace(out / shard["tmp"], out / name)
        row = {"name": name, "samples": shard["samples"], "bytes": shard["bytes"], "sha256": shard["sha256"]}
        if shard.get("sample_bytes"):
            row["sample_bytes"] = shard["sample_bytes"]
        shards.append(row)
    keep = {shard["name"] for shard in shards}
    pattern = re.compile(rf"{re.escape(config.split)}-\d{{6}}\.tar")
    for stale in out.iterdir():
        if pattern.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    _fsync_dir(out)

    counts = {"images": images, "written": written, "rejected": len(rejects)}
    text = "".join(f"{s['name']}\t{s['samples']}\t{s['bytes']}\t{s['sha256']}\n" for s in shards)
    meta["splits"][config.split] = {
        "source": spec,
        "source_digest": source_digest,
        "shard_size": config.shard_size,
        "counts": counts,
        "digest": hashlib.sha256(text.encode()).hexdigest(),
        "shards": shards,
        "rejects": rejects,
        "label_names": names,
    }
    meta["splits"] = dict(sorted(meta["splits"].items()))
    # check_label_names made every split that names classes agree, so the folder's names are any split's
    named = [entry["label_names"] for entry in meta["splits"].values() if entry.get("label_names")]
    meta.pop("label_names", None)
    if named:
        meta["label_names"] = named[0]
    meta["counts"] = {key: sum(entry["counts"][key] for entry in meta["splits"].values()) for key in counts}
    _write_folder_index(out, meta)
    return meta

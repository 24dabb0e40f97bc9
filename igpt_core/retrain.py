"""Retraining decisions: the batches in the watched folder, which of them are new, the palette's drift on
them, and the step a warm-started retrain continues from.

The watched folder holds batches: each entry (a folder of images, a tar, an .npz, a parquet file) is one
source, published whole by `publish_batches`. A batch is new until a registered model version lists its
content digest in the tag `NEW_DATA_TAG`; so the registry, not a local file, says what has been learned.
These are plain functions over paths, digests and tag dicts; the flow (flows/retrain.py) calls them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from igpt_core.palette import Palette, normalise
from igpt_core.sources import Sample, iter_source, open_source

NEW_DATA_TAG = "igpt.new_data"
"""Model version tag: JSON list of the batch digests that version was trained on."""
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

RefitReason = Literal["no", "asked", "drift"]


def watched_folder(watch: str | None, root: str | Path) -> Path:
    """The watched folder: `watch` when given, else `<root>/incoming`."""
    return Path(watch).expanduser().resolve() if watch else Path(root) / "incoming"


def list_batches(watch: Path) -> list[Path]:
    """The batches in the watched folder, by name; hidden entries (batches being copied in) are skipped."""
    if not watch.is_dir():
        return []
    return sorted(p for p in watch.iterdir() if not p.name.startswith("."))


def publish_batches(paths: Iterable[str | Path], to: str | Path) -> tuple[Path, list[str]]:
    """Copies `paths` into the watched folder `to`; returns the folder (resolved) and the batch names.

    Folders, tars, .npz and parquet files become a batch each (sources keep their own layout); loose image
    files are gathered into one folder batch. A batch's name carries a digest of its content, and it is
    copied under a hidden name and renamed when complete, so a reader never sees half a batch and adding
    the same content twice publishes it once.
    """
    watch = Path(to).expanduser().resolve()
    watch.mkdir(parents=True, exist_ok=True)
    sources = [Path(p).expanduser() for p in paths]
    if not sources:
        raise ValueError("paths: give at least one image file, folder or tar to add")
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"paths: no such file or folder: {', '.join(missing)}")
    loose = [p for p in sources if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    batches: list[str] = []
    for src in (p for p in sources if p not in loose):
        digest = _tree_digest(src)[:10]
        name = f"{src.name.split('.')[0]}-{digest}{''.join(src.suffixes) if src.is_file() else ''}"
        batches.append(_publish(watch, name, functools.partial(_copy, src)))
    if loose:
        # the sha256 of the JSON list of the files' digests, as names were made before this module
        listing = json.dumps([sorted(_file_digest(p) for p in loose)], separators=(",", ":"))
        digest = hashlib.sha256(listing.encode()).hexdigest()[:10]

        def copy_loose(tmp: Path) -> None:
            tmp.mkdir()
            for path in loose:
                shutil.copy2(path, tmp / path.name)

        batches.append(_publish(watch, f"images-{digest}", copy_loose))
    return watch, batches


def consumed_digests(version_tags: Iterable[Mapping[str, str]]) -> set[str]:
    """Digests of the batches that model versions (given by their tags) were trained on."""
    seen: set[str] = set()
    for tags in version_tags:
        seen.update(json.loads(tags.get(NEW_DATA_TAG, "[]")))
    return seen


def new_batches(found: Mapping[str, str], consumed: set[str]) -> dict[str, str]:
    """The batches (spec -> content digest) of `found` that no version has been trained on."""
    return {spec: digest for spec, digest in found.items() if digest not in consumed}


def base_step(saved_config: Mapping[str, Any], version_tags: Mapping[str, str]) -> int:
    """The step a warm-started retrain continues from: the checkpoint's config.json `step`, else the
    version's `igpt.step` tag, else 0."""
    return int(saved_config.get("step", version_tags.get("igpt.step", 0)))


@dataclass(frozen=True)
class RefitDecision:
    """Whether a retrain refits the palette, and the numbers that decided it."""

    reason: RefitReason
    """no: keep the palette; asked: the caller asked for a refit; drift: the new data's MSE drifted."""
    new_mse: float
    """Quantization MSE of the new held-out images with the current palette."""
    base_mse: float
    """The palette's own held-out MSE when it was fitted (nan when unknown)."""
    ratio: float
    """new_mse / base_mse (nan when base_mse is unknown or zero)."""

    @property
    def refit(self) -> bool:
        return self.reason != "no"


def refit_decision(new_mse: float, base_mse: float, *, refit: bool, threshold: float) -> RefitDecision:
    """Refit when asked, or when `new_mse` exceeds `threshold` times `base_mse`; an unknown ratio
    (no base MSE recorded) never counts as drift."""
    ratio = new_mse / base_mse if not math.isnan(base_mse) and base_mse > 0 else float("nan")
    drifted = not math.isnan(ratio) and ratio > threshold
    reason: RefitReason = "asked" if refit else ("drift" if drifted else "no")
    return RefitDecision(reason, new_mse, base_mse, ratio)


def quantization_mse(palette: Palette, spec: str, resolution: int, limit: int = 2000) -> float:
    """Mean squared error, in the [-1, 1] pixel scale, between images of `spec` and their palette colours
    (the first `limit` images). It measures how well the palette fits data it may not have seen: the
    palette stage records it on its held-out images, and a retrain compares new data against that."""
    batch = []
    for item in iter_source(open_source(spec), resolution):
        if isinstance(item, Sample):
            batch.append(item.image)
            if len(batch) >= limit:
                break
    if not batch:
        raise ValueError(f"{spec}: no valid images to measure the palette on")
    images = np.stack(batch)
    restored = palette.dequantize(palette.quantize(images), resolution)
    return float(np.mean((normalise(images) - normalise(restored)) ** 2))


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _publish(watch: Path, name: str, write: Callable[[Path], None]) -> str:
    final = watch / name
    if final.exists():
        return name  # the same content was added before: its name is its digest
    tmp = watch / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        write(tmp)
        tmp.rename(final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return name


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            sha.update(block)
    return sha.hexdigest()


def _tree_digest(path: Path) -> str:
    """sha256 over the relative names and bytes of every file under `path` (or of the file itself)."""
    if path.is_file():
        return _file_digest(path)
    sha = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        sha.update(str(item.relative_to(path)).encode() + b"\0" + bytes.fromhex(_file_digest(item)))
    return sha.hexdigest()

"""The deterministic train/held-out split of a source, by a hash of each image key, written as .npz files.

The split is a function of the keys alone: the same on every run and machine, and adding images to a
source never moves existing ones between splits. The .npz files are byte-for-byte reproducible, so their
content digests (what the pipeline's workspace keys on) are too.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from igpt_core.sources import Sample, SourceError, iter_source, open_source

_BUCKETS = 10_000


def is_heldout(key: str, fraction: float) -> bool:
    """Whether sample `key` goes to the held-out split (a larger `fraction` only adds keys to it)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _BUCKETS
    return bucket < fraction * _BUCKETS


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """An .npz (`x` uint8 images, `y` int64 labels) written byte-for-byte reproducibly: numpy's own
    savez stamps the current time into the zip, which would change the file's digest on every run."""
    arrays = {"x": np.ascontiguousarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["y"] = np.ascontiguousarray(labels, dtype=np.int64)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)
    return path


def split_source(
    specs: str | Iterable[str], out_dir: Path, *, fraction: float, resolution: int
) -> dict[str, int]:
    """Reads every image of `specs` at `resolution` and writes `train.npz` and `heldout.npz` in `out_dir`.

    Held-out membership is `is_heldout(key)`; with several specs keys are prefixed by the spec's index.
    Unlabelled images get label -1 when others are labelled; a split with no labels at all has no `y`.
    Returns counts (train, heldout, rejected).
    """
    spec_list = [specs] if isinstance(specs, str) else list(specs)
    images: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    labels: dict[str, list[int | None]] = {"train": [], "heldout": []}
    rejected = 0
    for index, spec in enumerate(spec_list):
        for item in iter_source(open_source(spec), resolution):
            if not isinstance(item, Sample):
                rejected += 1
                continue
            key = item.key if len(spec_list) == 1 else f"{index}/{item.key}"
            split = "heldout" if is_heldout(key, fraction) else "train"
            images[split].append(item.image)
            labels[split].append(item.label)
    for split in ("train", "heldout"):
        if not images[split]:
            raise SourceError(
                f"{', '.join(spec_list)}: no images left for the {split} split "
                f"(heldout_fraction={fraction}, {len(images['train']) + len(images['heldout'])} images)"
            )
        known = [lab for lab in labels[split] if lab is not None]
        y = np.array([-1 if lab is None else lab for lab in labels[split]], np.int64) if known else None
        write_npz(out_dir / f"{split}.npz", np.stack(images[split]), y)
    return {"train": len(images["train"]), "heldout": len(images["heldout"]), "rejected": rejected}

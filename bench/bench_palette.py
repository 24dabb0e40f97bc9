"""Palette fitting on CIFAR-10 (JPEG): igpt's k-means against scikit-learn's MiniBatchKMeans.

Same process, same pixels: the first `--images` train images (5,000 × 1,024 = 5.1M pixels by default),
K = 512, pixels scaled to [-1, 1] as x / 127.5 - 1. Reported per method: fit wall time, CPU seconds of
this process (scikit-learn's OpenMP threads included; Ray actors' CPU is not), and held-out
quantization MSE (mean squared RGB distance in [-1, 1] units per pixel, every pixel of the 10,000 test
images mapped to its nearest centre by the same exact quantizer for all methods).

- igpt histogram: `fit_palette(images, method="histogram")` (colour histogram + weighted Lloyd, coarse
  colour grids first, then the exact distinct colours; an array already at 32×32 is counted in this
  process).
- igpt minibatch: `fit_palette(images, method="minibatch")` (Ray actors hold the pixels; Ray start-up
  is excluded, actor start-up is included).
- scikit-learn: `MiniBatchKMeans(n_clusters=512, batch_size=--sk-batch (4096), n_init=1,
  max_iter=100, random_state=0)` with its default early stopping (max_no_improvement=10) and k-means++
  init, on a float32 (P, 3) pixel array. batch_size 4096 = 8 pixels per centre per step (its default 1024
  is 2 per centre, and its docs advise >= 256 × cores).

    .venv/bin/python bench/bench_palette.py [--images 10000] [--skip-sklearn] [--skip-minibatch]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

for _name, _value in (("DO_NOT_TRACK", "1"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def load_images(tars: list[Path], limit: int) -> np.ndarray:
    """The first `limit` images of the tars, uint8 (N, 32, 32, 3), read by igpt's sources."""
    from igpt_core.sources import Sample, open_source, read_part

    images: list[np.ndarray] = []
    for tar in tars:
        for record in read_part(open_source(str(tar)).parts()[0], 32):
            if isinstance(record, Sample):
                images.append(record.image)
                if len(images) == limit:
                    return np.stack(images)
    return np.stack(images)


def held_out_mse(centers: np.ndarray, test: np.ndarray) -> float:
    from igpt_core.palette import Palette

    palette = Palette(np.clip(centers, -1, 1))
    tokens = palette.quantize(test).reshape(-1)
    x = test.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    return float(np.mean(np.sum((x - palette.centers.astype(np.float64)[tokens]) ** 2, axis=1)))


def timed(fn):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=CIFAR)
    parser.add_argument("--images", type=int, default=5000, help="train images to fit on (1,024 px each)")
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sk-batch", type=int, default=4096, help="MiniBatchKMeans batch_size")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-minibatch", action="store_true")
    args = parser.parse_args()

    # scipy.spatial (igpt's k-d tree) is imported before the timings, as scikit-learn is: imports
    # are outside both sides' numbers.
    import scipy.spatial  # noqa: F401

    from igpt_core.distributed import ensure_ray
    from igpt_core.palette_fit import fit_palette

    train_tars = sorted(args.data.glob("train-*.tar"))
    if not train_tars:
        raise SystemExit(f"{args.data}: CIFAR-10 (JPEG) train tars not found")
    train, load_s, _ = timed(lambda: load_images(train_tars, args.images))
    test = load_images([args.data / "test-000000.tar"], 10_000)
    pixels = train.reshape(-1, 3)
    print(
        f"CIFAR-10 (JPEG): {len(train)} train images = {len(pixels):,} pixels (decoded in {load_s:.1f}s), "
        f"{len(test)} test images held out; K={args.clusters}; {os.cpu_count()} CPUs"
    )
    rows: list[tuple[str, float, float, float, str]] = []

    palette, wall, cpu = timed(
        lambda: fit_palette(train, clusters=args.clusters, seed=args.seed, progress=False)
    )
    info = palette.info
    rows.append(
        ("igpt histogram", wall, cpu, held_out_mse(palette.centers, test),
         f"{info['unique_colours']:,} distinct colours, {info['iterations']} full-data Lloyd iterations")
    )  # fmt: skip
    again = fit_palette(train, clusters=args.clusters, seed=args.seed, progress=False)
    print(f"histogram refit bit-identical: {again.centers.tobytes() == palette.centers.tobytes()}")

    if not args.skip_minibatch:
        ensure_ray()
        mb, wall, cpu = timed(
            lambda: fit_palette(
                train, clusters=args.clusters, seed=args.seed, method="minibatch", progress=False
            )
        )
        rows.append(
            ("igpt minibatch (Ray)", wall, cpu, held_out_mse(mb.centers, test),
             f"{mb.info['iterations']} steps of 65,536 px, {mb.info['workers']} actors")
        )  # fmt: skip

    if not args.skip_sklearn:
        from sklearn.cluster import MiniBatchKMeans

        x = pixels.astype(np.float32) / 127.5 - 1.0
        km = MiniBatchKMeans(
            n_clusters=args.clusters, batch_size=args.sk_batch, n_init=1, max_iter=100, random_state=args.seed
        )
        _, wall, cpu = timed(lambda: km.fit(x))
        rows.append(
            ("sklearn MiniBatchKMeans", wall, cpu, held_out_mse(km.cluster_centers_, test),
             f"batch_size={args.sk_batch}, {km.n_steps_} steps ({km.n_iter_} epochs)")
        )  # fmt: skip

    print(f"\n{'method':<26}{'fit wall s':>11}{'fit CPU s':>11}{'held-out MSE':>14}  notes")
    for name, wall, cpu, mse, note in rows:
        print(f"{name:<26}{wall:>11.2f}{cpu:>11.2f}{mse:>14.6f}  {note}")
    base = rows[0]
    for name, wall, cpu, mse, _ in rows[1:]:
        print(
            f"{name} / igpt histogram: wall {wall / base[1]:.1f}x, CPU {cpu / base[2]:.1f}x, "
            f"held-out MSE {mse / base[3]:.4f}x"
        )


if __name__ == "__main__":
    main()

"""Quantization speed: Palette.quantize against transformers' ImageGPTImageProcessor, identical tokens.

Same process, same 32×32 images (the first `--images` CIFAR-10 (JPEG) test images), same 512 float32
clusters. The processor is called as a user would for images already at 32×32:
`ImageGPTImageProcessor(clusters=centers, do_resize=False)(list_of_images, return_tensors="np")`, in
batches of `--batch` images (all 2,000 at once would need a 2M × 512 float32 distance table per
intermediate, several GiB). Without torchvision installed, transformers 5 serves the PIL/NumPy
backend (`ImageGPTImageProcessorPil`), which this bench therefore measures.

Ours is timed three ways: cold (a fresh Palette, empty colour cache, so every distinct colour of the
images is computed), streaming (a Palette whose cache was filled by quantizing `--prime` other images,
the first train images, then these unseen test images once: what tokenizing a dataset sees after its
first shards) and warm (the same images again, every colour cached). All three are printed with their
ratio. The palette: `--palette DIR` or 512 colours sampled from the train tar's pixels.

    .venv/bin/python bench/bench_quantize.py [--images 2000] [--batch 250] [--prime 10000] [--palette DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=CIFAR)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250, help="images per ImageGPTImageProcessor call")
    parser.add_argument("--palette", type=Path, default=None)
    parser.add_argument(
        "--prime", type=int, default=10_000, help="train images that fill the cache (streaming)"
    )
    args = parser.parse_args()

    from bench_palette import load_images
    from transformers import ImageGPTImageProcessor

    from igpt_core.palette import Palette, normalise

    images = load_images([args.data / "test-000000.tar"], args.images)
    if args.palette:
        centers = Palette.load(args.palette).centers
        origin = str(args.palette)
    else:
        train = load_images([args.data / "train-000000.tar"], 1000).reshape(-1, 3)
        centers = normalise(train[np.random.default_rng(0).choice(len(train), 512, replace=False)])
        origin = "512 colours sampled from train pixels"
    print(f"{len(images)} CIFAR-10 (JPEG) test images 32x32, palette: {origin}; {os.cpu_count()} CPUs")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = ImageGPTImageProcessor(clusters=centers, do_resize=False)
    print(f"reference: {type(processor).__name__} (transformers), batches of {args.batch}")
    start = time.perf_counter()
    reference = np.concatenate(
        [
            np.asarray(processor(list(images[i : i + args.batch]), return_tensors="np")["input_ids"])
            for i in range(0, len(images), args.batch)
        ]
    )
    ref_s = time.perf_counter() - start

    palette = Palette(centers)
    start = time.perf_counter()
    cold = palette.quantize(images)
    cold_s = time.perf_counter() - start
    warm_s = np.inf
    for _ in range(5):
        start = time.perf_counter()
        warm = palette.quantize(images)
        warm_s = min(warm_s, time.perf_counter() - start)
    streaming_palette = Palette(centers)
    streaming_palette.quantize(load_images([args.data / "train-000000.tar"], args.prime))
    start = time.perf_counter()
    streaming = streaming_palette.quantize(images)
    streaming_s = time.perf_counter() - start
    identical = all(np.array_equal(ours, reference) for ours in (cold, warm, streaming))
    print(f"tokens identical to the reference: {identical}")
    assert identical, "tokens differ from ImageGPTImageProcessor"

    n = len(images)
    print(f"\n{'':<34}{'seconds':>10}{'images/s':>12}")
    print(f"{'ImageGPTImageProcessor':<34}{ref_s:>10.3f}{n / ref_s:>12,.0f}")
    print(f"{'Palette.quantize cold (empty cache)':<34}{cold_s:>10.3f}{n / cold_s:>12,.0f}")
    print(
        f"{f'Palette.quantize streaming ({args.prime:,} primed)':<34}{streaming_s:>10.4f}{n / streaming_s:>12,.0f}"
    )
    print(f"{'Palette.quantize warm (best of 5)':<34}{warm_s:>10.4f}{n / warm_s:>12,.0f}")
    print(
        f"ratio cold: {ref_s / cold_s:,.1f}x   streaming: {ref_s / streaming_s:,.0f}x   warm: {ref_s / warm_s:,.0f}x"
    )


if __name__ == "__main__":
    main()

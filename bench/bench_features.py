"""Feature extraction for the probe against the training step's forward pass, and a probe's wall time.

1. Throughput, interleaved in this process with the same threads and batch: the training step's forward
   (train mode, gradients on, the whole model and lm_head, the trainer's precision and attention backend)
   in tokens/s, beside `features.extract_features` (inference mode, stopping at the probed block, the same
   precision rule and backend) in images/s and tokens/s. Extraction runs only blocks 0 .. layer - 1 of
   the model's n_layer, so it can be faster per token than the forward it is compared with.
2. The whole probe (`probe.probe_arrays`, defaults: layer n_layer // 2, four values of C, the random-init
   and raw-pixel baselines) on `--images` train and `--test-images` test images of CIFAR-10 (JPEG), with
   its seconds per phase, and a linear extrapolation to 100,000 train + 10,000 test images (labelled as
   such: feature extraction scales with the images; the logistic-regression fits are assumed to as well,
   which holds per L-BFGS iteration but not for the number of iterations).

The model is the `tiny` preset at random initialisation (extraction speed does not depend on the weights);
the palette is 512 distinct colours drawn from the images themselves (its quality does not matter here).

    .venv/bin/python bench/bench_features.py [--images 5000 --test-images 1000 --batch 64]
    .venv/bin/python bench/bench_features.py --images 100000 --test-images 10000 --mirror   # the 100k probe
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from igpt_core import attention
from igpt_core.config import ProbeConfig, preset
from igpt_core.features import extract_features, resolve_layers
from igpt_core.loop import autocast_dtype
from igpt_core.model import ImageGPT, inputs_from_tokens
from igpt_core.palette import Palette, normalise
from igpt_core.probe import probe_arrays
from igpt_core.sources import Sample, open_source, read_part

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="train images of the probe (0: skip the probe)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument(
        "--batch",
        type=int,
        default=ProbeConfig.batch_size,
        help="images per batch (ProbeConfig.batch_size's default)",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="the probe's progress bars on stderr (each phase's elapsed time)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed batches per side (median reported)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cifar", type=Path, default=CIFAR)
    p.add_argument(
        "--mirror",
        action="store_true",
        help="train on CIFAR-10's train images and their mirror images (left-right): up to 100,000",
    )
    return p.parse_args(argv)


def read_images(tars: list[Path], limit: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` decodable images of webdataset tars, in order (uint8 (N, R, R, 3)), and labels."""
    images, labels = [], []
    for tar in tars:
        for part in open_source(str(tar)).parts():
            for record in read_part(part, resolution):
                if isinstance(record, Sample) and record.label is not None:
                    images.append(record.image)
                    labels.append(record.label)
                    if len(images) == limit:
                        return np.stack(images), np.array(labels)
    return np.stack(images), np.array(labels)


def throughput(model: ImageGPT, tokens: np.ndarray, layers: list[int], args: argparse.Namespace) -> None:
    """Training forward tokens/s vs feature extraction images/s, interleaved, median of `--repeats`."""
    dtype = autocast_dtype(args.precision, torch.device("cpu"))
    inference_backend = attention.select(model, device="cpu", dtype=dtype, inference=True)  # as extraction
    backend = attention.select(model, device="cpu", dtype=dtype)  # as the trainer sets the model up
    inputs, _ = inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), model.config.start_token)
    n_tokens = inputs.numel()

    def train_forward() -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            model(inputs).float().sum()  # the step's forward; the graph for backward is built and dropped

    def features() -> None:
        extract_features(
            model, tokens, layers, batch_size=len(tokens), precision=args.precision, compile=False
        )

    def features_compiled() -> None:  # what extract_features runs from COMPILE_MIN_IMAGES images up
        extract_features(
            model, tokens, layers, batch_size=len(tokens), precision=args.precision, compile=True
        )

    runs = {
        "training forward": train_forward,
        "feature extraction": features,
        "  compiled": features_compiled,
    }
    for run in runs.values():  # warmup
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            wall[name].append(time.perf_counter() - start)
    print(
        f"precision {'bf16' if dtype is not None else 'fp32'}, attention {backend} (training) / "
        f"{inference_backend} (extraction), batch {len(tokens)}, "
        f"features of layer {layers} (blocks 0..{max(layers) - 1} of {model.config.n_layer} run)"
    )
    for name in runs:
        seconds = statistics.median(wall[name])
        print(
            f"  {name:<20}{seconds:>8.3f} s/batch{n_tokens / seconds:>10,.0f} tokens/s"
            f"{len(tokens) / seconds:>8.1f} images/s"
        )
    for name in ("feature extraction", "  compiled"):
        ratio = statistics.median(wall["training forward"]) / statistics.median(wall[name])
        print(f"  {name.strip()} / training forward: {ratio:.2f}x per image")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset("tiny")
    model = ImageGPT(config)
    layers = resolve_layers(None, config.n_layer)
    print(
        f"tiny preset: {config.n_layer} layers, d={config.n_embd}, {config.n_head} heads, R={config.resolution}, "
        f"K={config.vocab_size}; threads {args.threads}; torch {torch.__version__}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    started = time.perf_counter()
    wanted = max(args.images, args.batch)
    train_tars = sorted(args.cifar.glob("train-*.tar"))
    train_images, train_labels = read_images(train_tars, -(-wanted // 2) if args.mirror else wanted, 32)
    if args.mirror:  # each image and its mirror image, the same label
        train_images = np.concatenate([train_images, train_images[:, :, ::-1]])[:wanted]
        train_labels = np.concatenate([train_labels, train_labels])[:wanted]
    test_images, test_labels = read_images(
        sorted(args.cifar.glob("test-*.tar")), max(args.test_images, 1), 32
    )
    pixels = train_images[: min(len(train_images), 2000)].reshape(-1, 3)
    distinct = np.unique(pixels, axis=0)
    chosen = distinct[np.random.default_rng(0).choice(len(distinct), config.vocab_size, replace=False)]
    palette = Palette(centers=normalise(chosen))
    train_tokens, test_tokens = palette.quantize(train_images), palette.quantize(test_images)
    print(
        f"read and quantized {len(train_tokens)} + {len(test_tokens)} images in {time.perf_counter() - started:.1f}s"
    )

    throughput(model, train_tokens[: args.batch], layers, args)
    if args.images:
        started = time.perf_counter()
        result = probe_arrays(
            model,
            palette,
            (train_tokens[: args.images], train_labels[: args.images]),
            (test_tokens[: args.test_images], test_labels[: args.test_images]),
            ProbeConfig(precision=args.precision, batch_size=args.batch),
            progress=args.progress,
        )
        total = time.perf_counter() - started
        seconds = result["seconds"]
        kind = "CIFAR-10 (JPEG) images, train mirrored" if args.mirror else "CIFAR-10 (JPEG) images"
        n_train, n_test = len(train_tokens[: args.images]), len(test_tokens[: args.test_images])
        print(
            f"probe on {n_train:,} train + {n_test:,} test {kind}: {total:.1f} s = {total / 60:.1f} min; "
            f"test accuracy {result['accuracy']['test']:.3f} (the model is at random init)"
        )
        passes = 2 * (n_train + n_test)
        extraction = seconds["features"] + seconds["random_init_features"]
        print(
            f"  feature extraction: {extraction:.1f} s for {passes:,} image passes (the model's and the random-init "
            f"copy's) = {passes / extraction:,.0f} images/s (model {seconds['features']} s, random init "
            f"{seconds['random_init_features']} s)"
        )
        for name, fit, key in (
            ("model", result, "fit"),
            ("random init", result["baselines"]["random_init"], "random_init_fit"),
            ("raw pixels", result["baselines"]["raw_pixels"], "raw_pixels_fit"),
        ):
            its = fit["iterations"]
            print(
                f"  fits, {name:<12} {seconds[key]:>7.1f} s  dim {fit['feature_dim']:>5}  C {fit['C']:g}  "
                f"L-BFGS iterations by C {its['by_C']}, refit {its['refit']} (max_iter {its['max_iter']})  "
                f"val {fit['accuracy']['val']:.4f} test {fit['accuracy']['test']:.4f}"
            )
        if n_train + n_test < 110_000:
            scale = (100_000 + 10_000) / (n_train + n_test)
            print(
                f"extrapolated (linear, not measured) to 100,000 train + 10,000 test images: "
                f"{total * scale / 60:.0f} min (features {extraction * scale / 60:.0f} min)"
            )
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()

"""End-to-end tokenization of CIFAR-10 (JPEG): igpt's `tokenize` against the loop a user would write.

Ours: `igpt_core.tokens.tokenize` (Ray tasks, one per input tar; palette lookup table; deterministic tar
writer). Peer, in the same process: a single-process webdataset pipeline, `WebDataset(...).decode("rgb8")`
→ scikit-learn `pairwise_distances_argmin` (exact nearest colour) → `webdataset.ShardWriter`.

Default: the test tar + one train tar (20k images); `--all` takes all six (60k). The palette is fitted at
the start on the first `--fit-images` test images (histogram k-means, 512 colours) unless `--palette` names
one to load; the output says which. Images/s exclude Ray start-up (printed separately).

    .venv/bin/python bench/bench_tokenize.py [--all] [--palette DIR] [--skip-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

for _name, _value in (
    ("DO_NOT_TRACK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
):
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
RESOLUTION = 32


def _inputs(data: Path, everything: bool) -> list[tuple[str, list[Path]]]:
    """(split, tars) to tokenize: test + train-000000, or test + all five train tars."""
    train = sorted(data.glob("train-*.tar"))
    if not train or not (data / "test-000000.tar").exists():
        raise SystemExit(f"{data}: CIFAR-10 (JPEG) tars not found (need test-000000.tar and train-*.tar)")
    return [("test", [data / "test-000000.tar"]), ("train", train if everything else train[:1])]


def _palette(args: argparse.Namespace, data: Path):
    from igpt_core.palette import Palette, fit_palette
    from igpt_core.sources import Sample, open_source, read_part

    if args.palette:
        palette = Palette.load(args.palette)
        return palette, f"loaded from {args.palette} (K={palette.clusters})"
    start = time.perf_counter()
    part = open_source(str(data / "test-000000.tar")).parts()[0]
    images = []
    for record in read_part(part, RESOLUTION):
        if isinstance(record, Sample):
            images.append(record.image)
        if len(images) == args.fit_images:
            break
    palette = fit_palette(np.stack(images), clusters=args.clusters, resolution=RESOLUTION, progress=False)
    took = time.perf_counter() - start
    return palette, (
        f"fitted here: histogram k-means, K={palette.clusters}, on the first {len(images)} test images "
        f"({took:.1f} s)"
    )


def run_ours(inputs, palette, out: Path) -> dict:
    from igpt_core.distributed import ensure_ray
    from igpt_core.tokens import tokenize

    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    seconds = {"read": 0.0, "quantize": 0.0, "write": 0.0}
    images = written = 0
    wall = time.perf_counter()
    for split, tars in inputs:
        spec = str(tars[0]) if len(tars) == 1 else str(tars[0].parent / f"{split}-*.tar")
        result = tokenize(spec, palette, out, resolution=RESOLUTION, split=split, progress=False)
        for key in seconds:
            seconds[key] += result.seconds[key]
        images += result.counts["images"]
        written += result.counts["written"]
    wall = time.perf_counter() - wall
    return {
        "images": images,
        "written": written,
        "wall": wall,
        "ray_start": ray_start,
        "task_seconds": seconds,
    }


def run_peer(inputs, palette, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import webdataset as wds
    from sklearn.metrics import pairwise_distances_argmin

    centers = palette.centers.astype(np.float32)
    seconds = {"read": 0.0, "quantize": 0.0, "write": 0.0}
    tokens_by_split: dict[str, np.ndarray] = {}
    images = 0
    wall = time.perf_counter()
    for split, tars in inputs:
        dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
        samples = iter(dataset.decode("rgb8").to_tuple("__key__", "jpg", "cls"))
        kept = []
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=10_000, verbose=0) as sink:
            while True:
                start = time.perf_counter()
                batch = [sample for _, sample in zip(range(256), samples, strict=False)]
                seconds["read"] += time.perf_counter() - start
                if not batch:
                    break
                start = time.perf_counter()
                pixels = (
                    np.stack([image for _, image, _ in batch]).reshape(-1, 3).astype(np.float32) / 127.5 - 1
                )
                tokens = pairwise_distances_argmin(pixels, centers).astype(np.uint16).reshape(len(batch), -1)
                seconds["quantize"] += time.perf_counter() - start
                start = time.perf_counter()
                for (key, _, label), row in zip(batch, tokens, strict=True):
                    sink.write({"__key__": key, "tokens.npy": row, "cls": int(label)})
                seconds["write"] += time.perf_counter() - start
                kept.append(tokens)
                images += len(batch)
        tokens_by_split[split] = np.concatenate(kept)
    wall = time.perf_counter() - wall
    return {"images": images, "wall": wall, "seconds": seconds}, tokens_by_split


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=CIFAR, help="folder of the CIFAR-10 (JPEG) tars")
    parser.add_argument("--all", action="store_true", help="all 60k images (default: test + one train tar)")
    parser.add_argument("--palette", type=Path, help="load this palette instead of fitting one")
    parser.add_argument("--clusters", type=int, default=512, help="K of the fitted palette")
    parser.add_argument("--fit-images", type=int, default=2000, help="test images the palette is fitted on")
    parser.add_argument("--skip-peer", action="store_true", help="measure igpt only")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    from igpt_core.tokens import load_tokens

    inputs = _inputs(args.data, args.all)
    palette, how = _palette(args, args.data)
    print(f"palette: {how}")
    print(
        f"inputs: {', '.join(f'{split}: {len(tars)} tar(s)' for split, tars in inputs)}; cores: {os.cpu_count()}"
    )

    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        ours_dir, peer_dir = Path(tmp, "ours"), Path(tmp, "peer")
        peer_dir.mkdir()
        ours = run_ours(inputs, palette, ours_dir)
        ours_rate = ours["written"] / ours["wall"]
        split_seconds = ours["task_seconds"]
        total = sum(split_seconds.values())
        print(
            f"igpt tokenize : {ours['written']} images in {ours['wall']:.1f} s = {ours_rate:,.0f} images/s "
            f"(Ray start {ours['ray_start']:.1f} s, not counted)"
        )
        print(
            "  task time   : "
            + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in split_seconds.items())
            + " (summed over tasks running in parallel)"
        )
        record: dict = {"palette": how, "ours": ours, "ours_images_per_s": ours_rate}
        if not args.skip_peer:
            peer, peer_tokens = run_peer(inputs, palette, peer_dir)
            peer_rate = peer["images"] / peer["wall"]
            print(
                f"peer (wds+sklearn, 1 process): {peer['images']} images in {peer['wall']:.1f} s = {peer_rate:,.0f} images/s"
            )
            print("  time        : " + ", ".join(f"{k} {v:.1f} s" for k, v in peer["seconds"].items()))
            agree = []
            for split, _ in inputs:
                mine, _labels = load_tokens(ours_dir, split)
                agree.append(float(np.mean(mine == peer_tokens[split])))
            print(f"token agreement ours vs peer: {min(agree):.6f} (fraction of equal tokens, worst split)")
            print(f"ratio igpt / peer images/s: {ours_rate / peer_rate:.2f}x")
            record.update(
                peer=peer, peer_images_per_s=peer_rate, ratio=ours_rate / peer_rate, agreement=agree
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

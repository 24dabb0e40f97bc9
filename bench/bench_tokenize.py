"""End-to-end tokenization of CIFAR-10 (JPEG): igpt's `tokenize` against the loop a user would write.

Ours: `igpt_core.tokens.tokenize` (Ray tasks, one per input tar; palette lookup table; deterministic tar
writer). Peer, in the same process: a single-process webdataset pipeline, `WebDataset(...).decode("rgb8")`
→ scikit-learn `pairwise_distances_argmin` (exact nearest colour) → `webdataset.ShardWriter`.

Default: the test tar + one train tar (20k images); `--all` takes all six (60k). The palette is fitted at
the start on the first `--fit-images` test images (histogram k-means, 512 colours; saved under
bench/results/) unless `--palette` names one to load; the output says which. Ours tokenizes all tars as
one split (a folder of links to them: one Ray task per tar). Images/s exclude Ray start-up (printed).

    .venv/bin/python bench/bench_tokenize.py [--all] [--palette DIR] [--skip-peer]
"""

from __future__ import annotations

import argparse
import io
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


def _inputs(data: Path, everything: bool) -> list[Path]:
    """The tars to tokenize: test + train-000000, or test + all five train tars."""
    train = sorted(data.glob("train-*.tar"))
    if not train or not (data / "test-000000.tar").exists():
        raise SystemExit(f"{data}: CIFAR-10 (JPEG) tars not found (need test-000000.tar and train-*.tar)")
    return [data / "test-000000.tar", *(train if everything else train[:1])]


def _palette(args: argparse.Namespace, data: Path):
    from igpt_core.palette import Palette
    from igpt_core.palette_fit import fit_palette
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
    saved = palette.save(REPO / "bench" / "results" / f"tokenize-palette-{args.clusters}-{len(images)}")
    return palette, (
        f"fitted here: histogram k-means, K={palette.clusters}, on the first {len(images)} test images "
        f"({took:.1f} s; saved to {saved.relative_to(REPO)}, reuse with --palette)"
    )


def run_ours(tars: list[Path], palette, out: Path) -> dict:
    """One tokenize call over a folder holding (links to) the tars: one Ray task per tar."""
    from igpt_core.distributed import ensure_ray
    from igpt_core.tokens import tokenize

    source = out.parent / "source"
    source.mkdir()
    for tar in tars:
        (source / tar.name).symlink_to(tar)
    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    driver_cpu = time.process_time()
    result = tokenize(str(source), palette, out, resolution=RESOLUTION, split="train", progress=False)
    driver_cpu = time.process_time() - driver_cpu
    return {
        "images": result.counts["images"],
        "written": result.counts["written"],
        "wall": result.seconds["wall"],
        "ray_start": ray_start,
        "task_seconds": {k: result.seconds[k] for k in ("read", "quantize", "write")},
        "cpu": result.seconds["cpu"] + driver_cpu,
        "driver_cpu": driver_cpu,
    }


def run_peer(tars: list[Path], palette, out: Path) -> tuple[dict, np.ndarray]:
    """The single-process loop: webdataset decode, scikit-learn nearest centre, webdataset ShardWriter."""
    import webdataset as wds
    from sklearn.metrics import pairwise_distances_argmin

    centers = palette.centers.astype(np.float32)
    seconds = {"read": 0.0, "quantize": 0.0, "write": 0.0}
    kept = []
    cpu = time.process_time()
    wall = time.perf_counter()
    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
    samples = iter(dataset.decode("rgb8").to_tuple("__key__", "jpg", "cls"))
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        while True:
            start = time.perf_counter()
            batch = [sample for _, sample in zip(range(256), samples, strict=False)]
            seconds["read"] += time.perf_counter() - start
            if not batch:
                break
            start = time.perf_counter()
            pixels = np.stack([image for _, image, _ in batch]).reshape(-1, 3).astype(np.float32) / 127.5 - 1
            tokens = pairwise_distances_argmin(pixels, centers).astype(np.uint16).reshape(len(batch), -1)
            seconds["quantize"] += time.perf_counter() - start
            start = time.perf_counter()
            for (key, _, label), row in zip(batch, tokens, strict=True):
                sink.write({"__key__": key, "tokens.npy": row, "cls": int(label)})
            seconds["write"] += time.perf_counter() - start
            kept.append(tokens)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    tokens = np.concatenate(kept)
    return {"images": len(tokens), "wall": wall, "cpu": cpu, "seconds": seconds}, tokens


def read_back(ours_dir: Path) -> dict:
    """One pass over our shards with data.read_shards, and with webdataset + np.load (the peer reader)."""
    import webdataset as wds

    from igpt_core.data import read_shards
    from igpt_core.shards import list_shards

    start = time.perf_counter()
    ours = sum(1 for _ in read_shards(ours_dir, split="train"))
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dataset = wds.WebDataset(
        [str(p) for p in list_shards(ours_dir, "train")], shardshuffle=False, empty_check=False
    )
    peer = sum(
        1 for sample in dataset if np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False) is not None
    )
    peer_seconds = time.perf_counter() - start
    assert ours == peer, (ours, peer)
    return {"samples": ours, "ours_per_s": ours / ours_seconds, "peer_per_s": peer / peer_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=CIFAR, help="folder of the CIFAR-10 (JPEG) tars")
    parser.add_argument("--all", action="store_true", help="all 60k images (default: test + one train tar)")
    parser.add_argument("--palette", type=Path, help="load this palette instead of fitting one")
    parser.add_argument("--clusters", type=int, default=512, help="K of the fitted palette")
    parser.add_argument("--fit-images", type=int, default=1000, help="test images the palette is fitted on")
    parser.add_argument("--skip-peer", action="store_true", help="measure igpt only")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    from igpt_core.data import load_tokens

    tars = _inputs(args.data, args.all)
    for tar in tars:  # both sides read from the page cache, not whichever runs first from disk
        tar.read_bytes()
    palette, how = _palette(args, args.data)
    print(f"palette: {how}")
    print(
        f"input: {', '.join(t.name for t in tars)}; cores: {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.1f} (the machine is shared: wall-clock rates move with it)"
    )

    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        ours_dir, peer_dir = Path(tmp, "ours"), Path(tmp, "peer")
        peer_dir.mkdir()
        ours = run_ours(tars, palette, ours_dir)
        ours_rate = ours["written"] / ours["wall"]
        task = ours["task_seconds"]
        total = sum(task.values())
        print(
            f"igpt tokenize : {ours['written']} images in {ours['wall']:.1f} s = {ours_rate:,.0f} images/s "
            f"({len(tars)} Ray tasks; Ray start {ours['ray_start']:.1f} s not counted)"
        )
        print(
            "  task time   : "
            + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in task.items())
            + " (summed over tasks; they run in parallel)"
        )
        print(
            f"  cpu         : {ours['cpu']:.1f} s (tasks + driver {ours['driver_cpu']:.1f} s) = "
            f"{ours['written'] / ours['cpu']:,.0f} images per CPU-second"
        )
        record: dict = {
            "palette": how,
            "tars": [t.name for t in tars],
            "ours": ours,
            "ours_images_per_s": ours_rate,
        }
        if not args.skip_peer:
            peer, peer_tokens = run_peer(tars, palette, peer_dir)
            peer_rate = peer["images"] / peer["wall"]
            print(
                f"peer (webdataset + sklearn, 1 process): {peer['images']} images in {peer['wall']:.1f} s "
                f"= {peer_rate:,.0f} images/s"
            )
            print("  time        : " + ", ".join(f"{k} {v:.1f} s" for k, v in peer["seconds"].items()))
            print(
                f"  cpu         : {peer['cpu']:.1f} s = {peer['images'] / peer['cpu']:,.0f} images per CPU-second"
            )
            mine, _labels = load_tokens(ours_dir, "train")
            agreement = float(np.mean(mine == peer_tokens))
            print(f"token agreement ours vs peer: {agreement:.6f} (fraction of equal tokens)")
            back = read_back(ours_dir)
            print(
                f"read back {back['samples']} samples: igpt read_shards {back['ours_per_s']:,.0f}/s, "
                f"webdataset + np.load {back['peer_per_s']:,.0f}/s, ratio {back['ours_per_s'] / back['peer_per_s']:.2f}x"
            )
            record["read_back"] = back
            cpu_ratio = (ours["written"] / ours["cpu"]) / (peer["images"] / peer["cpu"])
            print(f"ratio igpt / peer images/s: {ours_rate / peer_rate:.2f}x")
            print(f"ratio igpt / peer images per CPU-second: {cpu_ratio:.2f}x")
            record.update(
                peer=peer,
                peer_images_per_s=peer_rate,
                ratio=ours_rate / peer_rate,
                cpu_ratio=cpu_ratio,
                agreement=agreement,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

"""Palette fit and tokenize at scale: `igpt palette` and `igpt tokenize` on 120,000 real images.

The source is built from CIFAR-10 (JPEG) (`../shared/data/cifar10`, 60,000 images): every train and test
image as it is (its JPEG bytes copied unchanged), plus a horizontally mirrored copy of each (the decoded
JPEG's pixels flipped left-right and written losslessly as PNG, key `<key>_flip`), written as 12
webdataset tars of 10,000 images (`orig-00000N.tar`, `flip-00000N.tar`) with the `classes.txt` beside
them. Mirrored CIFAR images are different images with the same colours, so the distinct-colour count is
that of the 60,000 originals (the flip does not add colours; it doubles the pixels counted).

Each command runs as its own process (the console script, a local Ray started by it) under
`/usr/bin/time -v`, which reports the largest resident set of any one process of the tree (the CLI or a
Ray worker or daemon, as reaped), and beside it a sampler that sums the resident sets of the whole
process tree (CLI, GCS, raylet, Ray workers) every 0.2 s from /proc; both peaks are printed.

    .venv/bin/python bench/bench_scale.py [--work /tmp/igpt-scale] [--clusters 512] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
IGPT = Path(sys.executable).with_name("igpt")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def build_source(out: Path) -> int:
    """Writes the 120,000-image source described in the module docstring; returns its image count."""
    import numpy as np
    from PIL import Image

    tars = sorted(CIFAR.glob("train-*.tar")) + sorted(CIFAR.glob("test-*.tar"))
    if len(tars) != 6:
        raise SystemExit(
            f"{CIFAR}: CIFAR-10 (JPEG) tars not found (need train-00000[0-4].tar, test-000000.tar)"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(CIFAR / "classes.txt", out / "classes.txt")
    images = 0
    for number, path in enumerate(tars):
        with (
            tarfile.open(path) as source,
            tarfile.open(out / f"orig-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as orig,
            tarfile.open(out / f"flip-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as flip,
        ):
            members: dict[str, dict[str, bytes]] = {}
            for info in source:
                if not info.isreg():
                    continue
                key, _, ext = info.name.partition(".")
                file = source.extractfile(info)
                members.setdefault(key, {})[ext] = file.read() if file else b""
            for key, parts in members.items():
                _member(orig, f"{key}.jpg", parts["jpg"])
                _member(orig, f"{key}.cls", parts["cls"])
                pixels = np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))[:, ::-1]
                png = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels)).save(png, format="PNG")
                _member(flip, f"{key}_flip.png", png.getvalue())
                _member(flip, f"{key}_flip.cls", parts["cls"])
                images += 2
    return images


def _tree_rss(root: int) -> int:
    """Bytes resident in `root` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(command: list[str], log: Path) -> dict[str, float]:
    """Runs `command` under /usr/bin/time -v; wall seconds, max RSS of one process, peak tree RSS."""
    timing = log.with_suffix(".time")
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", DO_NOT_TRACK="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(timing), *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        peak = [0]

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], _tree_rss(process.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; see {log}")
    text = timing.read_text()
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024  # type: ignore[union-attr]
    return {"wall_s": wall, "max_rss_one": max_rss, "peak_tree_rss": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/igpt-scale"))
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (source, palette, shards)")
    args = parser.parse_args()
    source, palette, shards = args.work / "source", args.work / "palette", args.work / "shards"
    if not (source / "classes.txt").exists():
        start = time.perf_counter()
        images = build_source(source)
        print(f"built {images:,} images in {source} ({time.perf_counter() - start:.0f} s)", flush=True)
    else:
        print(f"reusing the source in {source}", flush=True)
    shutil.rmtree(palette, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    load_before = os.getloadavg()
    fit = run_measured(
        [
            str(IGPT),
            "palette",
            "--source",
            str(source),
            "--clusters",
            str(args.clusters),
            "--out",
            str(palette),
        ],
        args.work / "palette.log",
    )
    info = json.loads((palette / "palette.json").read_text())
    print(
        f"palette: {fit}  palette.json: { {k: v for k, v in info.items() if k != 'source_digest'} }",
        flush=True,
    )
    tok = run_measured(
        [str(IGPT), "tokenize", "--source", str(source), "--palette", str(palette), "--out", str(shards)],
        args.work / "tokenize.log",
    )
    meta = json.loads((shards / "meta.json").read_text())
    shard_bytes = sum(p.stat().st_size for p in shards.glob("*.tar"))
    print(f"tokenize: {tok}  counts: {meta['counts']}  shards: {len(list(shards.glob('*.tar')))}", flush=True)
    load_after = os.getloadavg()
    images = meta["counts"]["images"]
    print()
    print(
        f"Source: {images:,} images (CIFAR-10 (JPEG) train+test and their mirrors), K={args.clusters}, R=32"
    )
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {os.cpu_count()} CPUs")
    print()
    print("| stage | wall s | images/s | peak RSS, largest process | peak RSS, process tree | notes |")
    print("|---|---|---|---|---|---|")
    colours = info.get("unique_colors", info.get("unique_colours"))
    print(
        f"| `igpt palette` | {fit['wall_s']:.0f} | {images / fit['wall_s']:,.0f} | "
        f"{fit['max_rss_one'] / 2**20:,.0f} MiB | {fit['peak_tree_rss'] / 2**20:,.0f} MiB | "
        f"{colours:,} distinct colours, {info['pixels']:,} pixels |"
    )
    print(
        f"| `igpt tokenize` | {tok['wall_s']:.0f} | {images / tok['wall_s']:,.0f} | "
        f"{tok['max_rss_one'] / 2**20:,.0f} MiB | {tok['peak_tree_rss'] / 2**20:,.0f} MiB | "
        f"{meta['counts']['written']:,} written, {meta['counts']['rejected']} rejected, "
        f"{shard_bytes / 2**20:,.0f} MiB of shards |"
    )
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Scale-out on Ray: 1 worker against 2 workers on two nodes, measured in one run; and a paper estimate
of data-parallel pretraining on a real GPU cluster.

Measured (every stage is the public igpt function, each in its own driver process):

- palette statistics + fit (`fit_palette`, histogram method) and tokenization (`tokenize`) of the same
  source, images/s: on a one-node Ray with 1 CPU, then on the two-node local cluster of
  infra/ray_up.sh (1 CPU per node, so 2 workers). The k-means fit itself runs on the driver in both.
- pretraining tokens/s (`pretrain`, Ray Train DDP over gloo) on the two-node cluster with 1 worker and
  with 2 workers (one per node, SPREAD), the same per-worker batch (weak scaling). tokens/s is the median
  of the reports after the first (which carries start-up).

Paper estimate (no measurement): N GPUs data parallel, each step computes `flops_per_token` x tokens on
every GPU at `--gpu-tflops` x `--mfu`, then ring-allreduces the gradients: every GPU sends and receives
2 (N-1)/N x params x bytes per gradient over `--link-gbps`. Assuming no overlap of compute and
communication, tokens/s(N) = N x tokens per GPU step / (compute + allreduce); the optimistic column lets
the allreduce hide behind the backward pass (2/3 of compute), as DDP's gradient buckets do.

    .venv/bin/python bench/bench_scaling.py [--source SPEC] [--steps 40] [--update-docs]
    .venv/bin/python bench/bench_scaling.py --paper-only --paper-preset l --gpu-tflops 989 --link-gbps 400
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

for _name, _value in (("DO_NOT_TRACK", "1"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_name, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
DOCS = REPO / "docs" / "SCALING.md"
BEGIN, END = "<!-- bench_scaling:begin -->", "<!-- bench_scaling:end -->"


def _load_cluster_module() -> Any:
    spec = importlib.util.spec_from_file_location("ray_cluster", REPO / "infra" / "ray_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ray_cluster"] = module
    spec.loader.exec_module(module)
    return module


def default_source(workdir: Path) -> str:
    """Two CIFAR-10 tars (two parts of 10k images) when ../shared has them, else sklearn's digits cut into
    four .npz parts (small: a smoke run, not a measurement)."""
    if (CIFAR / "train-000001.tar").exists():
        return str(CIFAR / "train-00000[01].tar")
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    folder = workdir / "digits"
    folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(images)), 4)):
        np.savez(folder / f"digits-{i}.npz", x=images[rows], y=digits.target[rows])
    return str(folder)


DATA_SCRIPT = """
import json, time, ray
if {local_cpus} is not None:
    ray.init(address="local", num_cpus={local_cpus}, include_dashboard=False, log_to_driver=False)
from igpt_core.palette_fit import fit_palette
from igpt_core.tokens import tokenize
began = time.perf_counter()
palette = fit_palette({source!r}, clusters={clusters}, resolution={resolution}, progress=False)
palette_s = time.perf_counter() - began
result = tokenize({source!r}, palette, {out!r}, resolution={resolution}, shard_size=5000, progress=False)
nodes = len([n for n in ray.nodes() if n["Alive"]])
print("RESULT", json.dumps({{"images": palette.info["images"], "palette_s": palette_s,
                            "tokenize_s": result.seconds["wall"], "nodes": nodes,
                            "palette_digest": palette.digest(), "shards_digest": result.manifest_digest}}))
"""

TRAIN_SCRIPT = """
import json
from igpt_core.config import ModelConfig, TrainConfig, preset
from igpt_core.palette_fit import fit_palette
from igpt_core.tokens import tokenize
from igpt_core.pretrain import pretrain
out = {out!r}
palette = fit_palette("builtin:digits", clusters=16, resolution=8, progress=False)
palette.save(out + "/palette")
tokenize("builtin:digits", palette, out + "/shards", resolution=8, shard_size=500, progress=False)
model = preset({preset!r}, vocab_size=16, resolution=8)
train = TrainConfig(steps={steps}, batch_size={batch} * {workers}, workers={workers}, warmup_steps=2,
                    log_every=5, eval_every={steps}, eval_batches=1, checkpoint_every={steps},
                    placement_strategy="SPREAD")
result = pretrain(out + "/shards", out + "/run", model=model, train=train, palette_dir=out + "/palette")
rates = [r["tokens_per_s"] for r in result.history[1:] if "tokens_per_s" in r]
print("RESULT", json.dumps({{"tokens_per_s": rates, "params": model.num_params(),
                            "flops_per_token": model.flops_per_token()}}))
"""


def run_local_driver(script: str, timeout_s: float) -> dict[str, Any]:
    """A driver with no RAY_ADDRESS (the script starts its own one-node Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
        timeout=timeout_s, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"driver failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure_data(cluster: Any, source: str, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    common = dict(source=source, clusters=args.clusters, resolution=args.resolution)
    one = run_local_driver(DATA_SCRIPT.format(local_cpus=1, out=str(work / "one"), **common), args.timeout)
    two = cluster.run_driver(
        DATA_SCRIPT.format(local_cpus=None, out=str(work / "two"), **common), timeout_s=args.timeout
    )
    if (one["palette_digest"], one["shards_digest"]) != (two["palette_digest"], two["shards_digest"]):
        raise RuntimeError("1 and 2 workers gave different palettes or shards: the comparison is void")
    return {"1 worker": one, "2 workers (2 nodes)": two}


def measure_train(cluster: Any, work: Path, args: argparse.Namespace) -> dict[int, dict]:
    out = {}
    for workers in (1, 2):
        folder = work / f"train-{workers}"
        script = TRAIN_SCRIPT.format(
            out=str(folder), preset=args.preset, steps=args.steps, batch=args.batch, workers=workers
        )
        out[workers] = cluster.run_driver(script, timeout_s=args.timeout)
    return out


def paper_estimate(args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """Markdown rows: N GPUs -> tokens/s, scaling efficiency, allreduce share of the step."""
    from igpt_core.config import preset

    model = preset(args.paper_preset)
    params = model.num_params()
    tokens_per_gpu_step = args.paper_batch * model.block_size
    compute_s = model.flops_per_token() * tokens_per_gpu_step / (args.gpu_tflops * 1e12 * args.mfu)
    rows = []
    single = tokens_per_gpu_step / compute_s
    for n in (1, 2, 8, 32, 128, 512):
        volume = 2 * (n - 1) / n * params * args.grad_bytes  # bytes each GPU sends (and receives)
        comm_s = volume / (args.link_gbps * 1e9 / 8)
        rate = n * tokens_per_gpu_step / (compute_s + comm_s)
        # DDP overlaps bucketed allreduce with the backward pass (~2/3 of compute): the optimistic bound.
        overlapped = n * tokens_per_gpu_step / (compute_s / 3 + max(2 * compute_s / 3, comm_s))
        rows.append(
            f"| {n} | {rate:,.0f} | {rate / (n * single):.0%} | {overlapped / (n * single):.0%} "
            f"| {comm_s / (compute_s + comm_s):.0%} | {volume / 1e9:.2f} |"
        )
    facts = {
        "params": params,
        "tokens_per_gpu_step": tokens_per_gpu_step,
        "compute_s": compute_s,
        "flops_per_token": model.flops_per_token(),
    }
    return rows, facts


def render(
    data: dict | None, train: dict | None, paper: tuple[list[str], dict], args: argparse.Namespace
) -> str:
    lines = []
    if data is not None:
        one, two = data["1 worker"], data["2 workers (2 nodes)"]
        lines += [
            f"Data stages, source `{args.source_label}` ({one['images']:,} images, K={args.clusters}, "
            f"R={args.resolution}); images/s, identical palette and shards on both sides:",
            "",
            "| stage | 1 worker | 2 workers (2 nodes) | ratio |",
            "|---|---|---|---|",
        ]
        for stage in ("palette", "tokenize"):
            a, b = one["images"] / one[f"{stage}_s"], two["images"] / two[f"{stage}_s"]
            lines.append(f"| {stage} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
        lines.append("")
    if train is not None:
        r1 = statistics.median(train[1]["tokens_per_s"])
        r2 = statistics.median(train[2]["tokens_per_s"])
        lines += [
            f"Pretraining, preset `{args.preset}` at 8x8 ({train[1]['params']:,} parameters), "
            f"{args.batch} sequences per worker per step, {args.steps} steps; tokens/s (median of reports):",
            "",
            "| workers | tokens/s | ratio to 1 worker |",
            "|---|---|---|",
            f"| 1 (head node) | {r1:,.0f} | 1.00x |",
            f"| 2 (one per node, DDP over gloo) | {r2:,.0f} | {r2 / r1:.2f}x |",
            "",
        ]
    rows, facts = paper
    lines += [
        f"Paper estimate, preset `{args.paper_preset}` at 32x32 ({facts['params'] / 1e6:,.0f}M parameters, "
        f"{facts['flops_per_token'] / 1e9:.2f} GFLOP per token), {args.paper_batch} sequences per GPU per "
        f"step, {args.gpu_tflops:g} TFLOP/s x MFU {args.mfu:g} per GPU ({facts['compute_s'] * 1e3:.0f} ms "
        f"compute per step), {args.grad_bytes}-byte gradients, ring allreduce at {args.link_gbps:g} Gbit/s "
        "per GPU, no overlap:",
        "",
        "| GPUs | tokens/s (no overlap) | efficiency (no overlap) | efficiency (allreduce hidden in "
        "backward) | allreduce share of step | GB sent per GPU per step |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines)


def update_docs(text: str) -> None:
    doc = DOCS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOCS}: no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="image source for the data stages (default: two CIFAR tars)")
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--preset", default="tiny", help="model preset for the measured training")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per driver")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--paper-only", action="store_true", help="only the estimate (starts no Ray)")
    parser.add_argument("--paper-preset", default="l")
    parser.add_argument("--paper-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient value (fp32: 4)")
    parser.add_argument("--link-gbps", type=float, default=400.0, help="per-GPU network (400G InfiniBand)")
    parser.add_argument("--update-docs", action="store_true", help=f"write the tables into {DOCS.name}")
    args = parser.parse_args()

    paper = paper_estimate(args)
    data = train = None
    if not args.paper_only:
        ray_cluster = _load_cluster_module()
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            work = Path(tmp)
            source = args.source or default_source(work)
            args.source_label = args.source or (
                "CIFAR-10 train-000000..1.tar" if "cifar10" in source else "digits npz x4"
            )
            with ray_cluster.LocalCluster.start(work / "state") as cluster:
                if not args.skip_data:
                    data = measure_data(cluster, source, work, args)
                if not args.skip_train:
                    train = measure_train(cluster, work, args)
    text = render(data, train, paper, args)
    print(text)
    if args.update_docs:
        update_docs(text)


if __name__ == "__main__":
    main()

"""Sampling throughput: igpt's KV-cache `generate` vs transformers' `generate`, on identical weights.

A random-initialised transformers ImageGPTForCausalImageModeling is saved with `save_pretrained` and
imported through igpt's own `hf.load_hf`, so both sides hold the same tensors. Both draw whole images
(R*R tokens after the start token) for a batch, fp32, in this process with the same thread count, runs
interleaved. Reported: median wall and CPU seconds per batch, images/s (and per CPU-second) and
ours ÷ theirs, for top-k sampling and for greedy decoding; greedy outputs are compared token by token
(they should be identical). igpt's decode step is the C++ one (igpt_core/native.py) unless IGPT_NATIVE=0
or it cannot be built; the bench prints which ran.

The default R=32 (1024 tokens per image) is iGPT's own setting and the project's default resolution;
context length matters here, since every step attends over all earlier positions (and transformers'
DynamicCache grows by concatenation, copying the whole cache every step). `--resolution 16` is the
short-context case. `--r64` is the 64x64 check (4,096 tokens per image, the training bench's R=64 shape):
2 layers, d=256, 8 heads, batch 2, one timed batch per side and mode.

    .venv/bin/python bench/bench_sample.py [--layers 4 --embd 128 --heads 4 --resolution 32 --batch 8]
    .venv/bin/python bench/bench_sample.py --r64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from igpt_core import native
from igpt_core.generation import generate
from igpt_core.hf import load_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128, help="default: the `tiny` preset, igpt's CPU model")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--resolution", type=int, default=32, help="image side R: R*R tokens per image")
    p.add_argument("--clusters", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per side and mode (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--r64", action="store_true", help="the 64x64 check: 2 layers, d=256, 8 heads, R=64, batch 2"
    )
    args = p.parse_args(argv)
    if args.r64:
        args.layers, args.embd, args.heads, args.resolution, args.batch, args.repeats = 2, 256, 8, 64, 2, 1
    return args


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of this process, result)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    positions = args.resolution**2
    hf_cfg = ImageGPTConfig(
        vocab_size=args.clusters + 1,
        n_positions=positions,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    theirs = ImageGPTForCausalImageModeling(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = load_hf(folder)
    prefix = torch.full((args.batch, 1), args.clusters)  # the start token
    new = positions  # every pixel of the image

    def hf_generate(sample: bool) -> torch.Tensor:
        kwargs = dict(top_k=args.top_k, temperature=args.temperature) if sample else {}
        return theirs.generate(
            input_ids=prefix, max_new_tokens=new, do_sample=sample, pad_token_id=0, **kwargs
        )

    def ours_generate(sample: bool) -> torch.Tensor:
        temperature = args.temperature if sample else 0.0
        return generate(ours, prefix, new, temperature=temperature, top_k=args.top_k if sample else None)

    print(
        f"shape: {args.layers} layers, d={args.embd}, {args.heads} heads, R={args.resolution} "
        f"({new} tokens/image), batch {args.batch}, K={args.clusters}, top_k={args.top_k}, "
        f"temperature={args.temperature}; fp32; threads {args.threads}; torch {torch.__version__}"
    )
    native_step = native.usable(ours, torch.device("cpu"), torch.float32) and native.decode_extension()
    print(
        f"igpt decode step: {'C++ (igpt_core/native.py)' if native_step else 'PyTorch (IGPT_NATIVE=0 or no build)'}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    hf_generate(True)  # warmup: first calls allocate and build transformers' generation config
    ours_generate(True)

    results: dict[str, float] = {}
    for mode, sample in (("top-k sampling", True), ("greedy", False)):
        wall: dict[str, list[float]] = {"igpt": [], "transformers": []}
        cpu: dict[str, list[float]] = {"igpt": [], "transformers": []}
        outputs: dict[str, torch.Tensor] = {}
        runs = {"igpt": ours_generate, "transformers": hf_generate}
        for _ in range(args.repeats):
            for side, run in runs.items():
                seconds, cpu_seconds, outputs[side] = timed(lambda run=run, sample=sample: run(sample))
                wall[side].append(seconds)
                cpu[side].append(cpu_seconds)
        # on an oversubscribed machine wall time mostly measures the scheduler: CPU time is printed beside it
        rates = {side: args.batch / statistics.median(ts) for side, ts in wall.items()}
        cpu_rates = {side: args.batch / statistics.median(ts) for side, ts in cpu.items()}
        for side in runs:
            print(
                f"{mode:<16}{side:<14}{statistics.median(wall[side]):>8.3f} s/batch{rates[side]:>8.2f} images/s"
                f"{statistics.median(cpu[side]):>9.3f} cpu-s/batch{cpu_rates[side]:>8.2f} images/cpu-s"
            )
        print(
            f"{mode:<16}ratio igpt / transformers: {rates['igpt'] / rates['transformers']:.2f}x wall, "
            f"{cpu_rates['igpt'] / cpu_rates['transformers']:.2f}x cpu"
        )
        if not sample:
            same = (outputs["igpt"] == outputs["transformers"]).all(dim=1)
            print(f"greedy outputs identical: {int(same.sum())}/{args.batch} images token for token")
            results["greedy_identical"] = float(same.float().mean())
        for side in runs:
            results[f"{mode} {side}"], results[f"{mode} {side} per cpu-s"] = rates[side], cpu_rates[side]
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return results


if __name__ == "__main__":
    main()

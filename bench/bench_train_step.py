"""Training-step throughput: igpt's ImageGPT vs transformers' ImageGPTForCausalImageModeling.

One step = forward, cross-entropy on all positions, backward, AdamW step. Both models have the same shape,
no dropout, the same (fused) AdamW, the same loss code and run in this process with the same thread count;
their steps are interleaved so that load from other processes hits both alike. Each side is timed in fp32
and under CPU bf16 autocast (transformers' model runs under autocast too; its eager attention is what it
has). Reported: median wall and CPU seconds per step over the timed steps, tokens/s and tokens per
CPU-second, and ours ÷ theirs. The headline ratio is igpt as its trainer runs by default on this machine
(the training loop's precision="auto": bf16 autocast on CPUs with native bf16, else fp32, and the attention
backend `igpt_core.attention.select` picks for that, as the trainer does) against transformers as a user runs
it (fp32, eager attention); bf16 against bf16 is printed beside it.
Warmup steps (and torch.compile's compilation, with --compile) are excluded from the timings. The load
average is printed before and after: on a shared machine it says how far to trust the wall times.

`--memory` adds each side's peak memory for a training step, measured in a child process of its own per
side (so neither side's allocations or allocator caches count against the other): the child builds the
model, its optimizer and the batch, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` <- 5), runs
two steps (the first allocates AdamW's state; the second is a steady step) and reads `VmHWM` from
`/proc/self/status`; reported is that peak minus the resident
size at the reset, i.e. what the steps themselves add (activations, attention scores, gradients, AdamW
state). `--r64` is the 64x64 check: 2 layers, d=256, 8 heads, R=64 (4,096 tokens), batch 2, fp32 (what both
sides run here without native bf16), with `--memory`. `--memory-only` skips the timed comparison.

    .venv/bin/python bench/bench_train_step.py [--layers 4 --embd 256 --heads 8 --resolution 32 --batch 8]
    .venv/bin/python bench/bench_train_step.py --r64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from igpt_core import attention
from igpt_core.config import ModelConfig
from igpt_core.loop import autocast_dtype
from igpt_core.model import ImageGPT, inputs_from_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--clusters", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument(
        "--memory", action="store_true", help="also measure each side's peak memory (child processes)"
    )
    p.add_argument("--memory-only", action="store_true", help="measure peak memory only, no timings")
    p.add_argument(
        "--r64", action="store_true", help="the 64x64 check: 2 layers, d=256, 8 heads, R=64, batch 2"
    )
    p.add_argument("--child", choices=["igpt", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.memory = args.memory or args.memory_only
    if args.r64:
        args.layers, args.embd, args.heads, args.resolution, args.batch = 2, 256, 8, 64, 2
        args.memory = True
        if args.precision == "both":
            args.precision = "fp32"
    return args


def _status_kib(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_peak(args: argparse.Namespace, side: str, build: Callable[[], Callable]) -> None:
    """In a child process: one side's steps, printing one JSON line with its peak memory above baseline."""
    step = build()
    tokens = torch.randint(0, args.clusters, (args.batch, args.resolution**2))
    inputs, targets = inputs_from_tokens(tokens, args.clusters)
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as marks:  # resets VmHWM to the current RSS
        marks.write("5")
    for _ in range(2):
        step(inputs, targets)
    peak = _status_kib("VmHWM")
    print(json.dumps({"side": side, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024}))


def measure_peaks(argv: list[str] | None, sides: list[str]) -> dict[str, float]:
    """Each side's peak memory above its baseline (MiB), each measured by `child_peak` in a fresh process."""
    peaks: dict[str, float] = {}
    for side in sides:
        done = subprocess.run(
            [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", side],
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[side] = record["peak_mib"] - record["baseline_mib"]
        print(
            f"peak memory {side}: {peaks[side]:,.0f} MiB above its baseline "
            f"({record['baseline_mib']:,.0f} MiB resident after imports, model, optimizer and batch)"
        )
    return peaks


def make_step(model: torch.nn.Module, logits_of: Callable, bf16: bool) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = logits_of(model, inputs)  # (B, T, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ours_logits(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs)


def hf_logits(model: Any, inputs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs, use_cache=False).logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.clusters,
        resolution=args.resolution,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.embd,
    )
    hf_cfg = ImageGPTConfig(
        vocab_size=args.clusters + 1,
        n_positions=cfg.block_size,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    tokens = torch.randint(0, args.clusters, (args.batch, cfg.block_size))
    inputs, targets = inputs_from_tokens(tokens, cfg.start_token)
    n_tokens = inputs.numel()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]

    def ours(bf16: bool) -> ImageGPT:
        """A model set up as the trainer sets it up: the attention backend chosen for this precision."""
        model = ImageGPT(cfg).train()
        backends.add(attention.select(model, device="cpu", dtype=torch.bfloat16 if bf16 else None))
        return model

    backends: set[str] = set()
    default = "bf16" if autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16 else "fp32"
    if args.child:  # one side at a time for --memory: igpt as its trainer runs here, transformers in fp32
        if args.child == "igpt":
            child_peak(
                args, "igpt", lambda: make_step(ours(default == "bf16"), ours_logits, default == "bf16")
            )
        else:
            hf = ImageGPTForCausalImageModeling(hf_cfg).train()
            child_peak(args, "transformers", lambda: make_step(hf, hf_logits, False))
        return {}

    if args.memory_only:
        peaks = measure_peaks(argv, ["igpt", "transformers"])
        print(f"peak memory igpt {default} / transformers fp32: {peaks['igpt'] / peaks['transformers']:.2f}x")
        return {f"peak MiB {side}": mib for side, mib in peaks.items()}

    variants: dict[str, Callable] = {}
    for prec in precisions:
        bf16 = prec == "bf16"
        variants[f"igpt {prec}"] = make_step(ours(bf16), ours_logits, bf16)
        variants[f"transformers {prec}"] = make_step(
            ImageGPTForCausalImageModeling(hf_cfg).train(), hf_logits, bf16
        )
        if args.compile:
            compiled = torch.compile(ours(bf16))  # selected before compiling, so the graph holds the op
            variants[f"igpt {prec} compiled"] = make_step(compiled, ours_logits, bf16)

    print(
        f"shape: {args.layers} layers, d={args.embd}, {args.heads} heads, R={args.resolution} "
        f"(T={cfg.block_size}), batch {args.batch}, K={args.clusters}; threads {args.threads}; "
        f"torch {torch.__version__}; igpt's default precision here: {default}; "
        f"igpt's attention: {' / '.join(sorted(backends))}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for name, step in variants.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(inputs, targets)
        print(f"  warmup {name}: {time.perf_counter() - start:.1f}s (excluded; includes any compilation)")

    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):  # interleaved: each round times every variant once
        for name, step in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(inputs, targets)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    # wall-clock rates are what a user sees on an idle machine; on a shared, oversubscribed one they mostly
    # measure the scheduler, so tokens per CPU-second (all threads of this process) is printed beside them
    results: dict[str, float] = {}
    print(f"{'variant':<28}{'wall s/step':>12}{'tokens/s':>10}{'cpu s/step':>12}{'tokens/cpu-s':>14}")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        results[name], results[f"{name} per cpu-s"] = n_tokens / w, n_tokens / c
        print(f"{name:<28}{w:>12.3f}{n_tokens / w:>10,.0f}{c:>12.3f}{n_tokens / c:>14,.0f}")
    peers = [k for k in variants if k.startswith("transformers")]
    for name in (k for k in variants if k.startswith("igpt")):
        for peer in peers:
            by_wall = results[name] / results[peer]
            by_cpu = results[f"{name} per cpu-s"] / results[f"{peer} per cpu-s"]
            print(f"ratio {name} / {peer}: {by_wall:.2f}x wall, {by_cpu:.2f}x cpu")
    best = {
        side: max(results[f"{k} per cpu-s"] for k in variants if k.startswith(side))
        for side in ("igpt", "transformers")
    }
    print(f"ratio best igpt / best transformers (cpu): {best['igpt'] / best['transformers']:.2f}x")
    ours, theirs = f"igpt {default}", "transformers fp32"
    if ours in variants and theirs in variants:
        print(
            f"headline: {ours} (igpt's default) / {theirs} (as a user runs it): "
            f"{results[ours] / results[theirs]:.2f}x wall, "
            f"{results[f'{ours} per cpu-s'] / results[f'{theirs} per cpu-s']:.2f}x cpu"
        )
    if args.memory:
        peaks = measure_peaks(argv, ["igpt", "transformers"])
        results.update({f"peak MiB {side}": mib for side, mib in peaks.items()})
        print(
            f"peak memory igpt {default} / transformers fp32: {peaks['igpt'] / peaks['transformers']:.2f}x "
            f"(target at most 0.5x)"
        )
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return results


if __name__ == "__main__":
    main()

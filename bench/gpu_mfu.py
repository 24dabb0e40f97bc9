"""Training throughput and model FLOPs utilisation (MFU) of igpt's ImageGPT on one GPU.

For each preset (default s and m at R=32): bf16 autocast with fp32 master weights, flash attention forced
through SDPA, fused AdamW; a few warmup steps (which include torch.compile's compilation with --compile),
then timed steps with a device synchronise around each one. Reported per preset: median seconds per
step, tokens/s, model TFLOP/s (config.flops_per_token() x tokens/s) and MFU = that / --peak-tflops
(default 989, H200 dense bf16), and peak memory. Sized to finish well under 5 minutes on an H200.

On a machine without CUDA it runs a tiny shape on the CPU in a few seconds, as a smoke test of the
script itself (the MFU printed then is against the given peak and means nothing).

    python bench/gpu_mfu.py [--presets s,m] [--batch 64,32] [--compile] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from igpt_core import attention
from igpt_core.config import preset
from igpt_core.model import ImageGPT, inputs_from_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--presets", default=None, help="comma-separated presets; default s,m on GPU, tiny on CPU")
    p.add_argument("--resolution", type=int, default=None, help="image side R; default 32 on GPU, 8 on CPU")
    p.add_argument("--batch", default=None, help="sequences per step, one value or one per preset")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the chip (H200: 989)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time excluded)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads; default 1 for the CPU smoke test")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def measure(name: str, batch: int, resolution: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Times training steps of one preset; returns its row of the results table."""
    cfg = preset(name, resolution=resolution)
    torch.manual_seed(0)
    with device:  # initialise on the device: filling hundreds of millions of weights on the host is slow
        model = ImageGPT(cfg).train()
    # as the trainer sets a model up: SDPA on a GPU; on the CPU smoke test, the bf16 kernel where it applies
    attention.select(model, device=device, dtype=torch.bfloat16)
    opt = model.configure_optimizer(weight_decay=0.01, lr=1e-4)
    step_model: Any = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
    inputs, targets = inputs_from_tokens(tokens, cfg.start_token)

    # eager: flash attention is required, not just preferred (an error beats a silent slow fallback);
    # compiled: SDPA's own backend choice, which prefers flash for bf16 on recent GPUs
    def attention_policy() -> AbstractContextManager:
        return nullcontext() if args.compile else sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    def step() -> torch.Tensor:
        with attention_policy(), torch.autocast(device.type, dtype=torch.bfloat16):
            logits = step_model(inputs)  # (B, T, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = inputs.numel() / median
    tflops = tokens_per_s * cfg.flops_per_token() / 1e12
    row = {
        "preset": name,
        "params_M": cfg.num_params() / 1e6,
        "resolution": resolution,
        "batch": batch,
        "compile": args.compile,
        "warmup_s": warmup_s,
        "median_step_s": median,
        "tokens_per_s": tokens_per_s,
        "model_tflops": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss),
    }
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    names = (args.presets or ("s,m" if on_gpu else "tiny")).split(",")
    resolution = args.resolution or (32 if on_gpu else 8)
    batches = [int(b) for b in (args.batch or ("64,32" if on_gpu else "2")).split(",")]
    if len(batches) == 1:
        batches = batches * len(names)
    if len(batches) != len(names):
        raise SystemExit(f"--batch: {len(batches)} values for {len(names)} presets")
    if on_gpu and args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # only the fp32 loss/optimizer math is affected
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    else:
        # one thread: a smoke test on a shared machine should not fight other processes for cores
        torch.set_num_threads(args.threads or 1)
        print(f"device: cpu (smoke test, not a measurement); torch {torch.__version__}")

    rows = []
    for name, batch in zip(names, batches, strict=True):
        row = measure(name, batch, resolution, args, device)
        rows.append(row)
        if on_gpu:
            torch.cuda.empty_cache()  # the previous preset's model is gone; give its memory back
        mem = f"{row['peak_mem_GiB']:.1f} GiB" if row["peak_mem_GiB"] is not None else "-"
        print(
            f"{name:>5} {row['params_M']:7.1f}M R={resolution} batch {batch:>3} compile={args.compile}: "
            f"{row['median_step_s'] * 1e3:8.1f} ms/step {row['tokens_per_s']:>12,.0f} tokens/s "
            f"{row['model_tflops']:7.1f} TFLOP/s  MFU {row['mfu'] * 100:5.1f}% of {args.peak_tflops:g}  "
            f"peak mem {mem}  (warmup {row['warmup_s']:.1f}s excluded, loss {row['final_loss']:.3f})"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

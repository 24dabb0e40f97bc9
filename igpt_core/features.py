"""Features of images under a pretrained model, and the inference context every forward pass runs in.

The feature of an image is the input of block l's attention (the normalised residual stream), averaged
over positions (`extract_features`); the raw-pixel baseline the probe compares it with is the dequantized
image (`pixel_features`). Forward passes run under `fast_inference`, as training runs them: eval mode,
`torch.inference_mode`, bf16 where the hardware has it natively (the trainer's precision rule,
`feature_dtype`) and the training attention backend. The probe fits on these features, the pyfunc model
serves them, and `classify` runs its classifier under the same context.

`ProbeError` is defined here rather than in `probe`: a layer the model lacks or an unknown precision is
found here, and the probe, `classify` and the CLI catch one error for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from igpt_core.loop import autocast_dtype

if TYPE_CHECKING:
    from torch import nn

    from igpt_core.model import ImageGPT
    from igpt_core.palette import Palette


logger = logging.getLogger(__name__)


class ProbeError(ValueError):
    """Bad probe input (unlabelled shards, one class, wrong resolution, a layer the model lacks, an unknown
    precision); the message names the input."""


def resolve_layers(layer: int | str | None, n_layer: int) -> list[int]:
    """The blocks to probe: [n_layer // 2] by default, every block for 'all'."""
    if layer is None:
        return [n_layer // 2]
    if layer == "all":
        return list(range(n_layer))
    if not isinstance(layer, int) or not 0 <= layer < n_layer:
        raise ProbeError(
            f"layer: must be in [0, {n_layer - 1}] or 'all' for a {n_layer}-layer model, got {layer!r}"
        )
    return [layer]


def feature_dtype(precision: str, device: Any) -> Any:
    """The autocast dtype of feature extraction: the trainer's rule (`precision` auto: bf16 where the
    hardware does it natively, a CUDA GPU that supports it or a CPU with AVX512-BF16 / AMX; else None,
    fp32); bf16 and fp32 force it."""
    import torch  # heavy: torch

    if precision not in ("auto", "bf16", "fp32"):
        raise ProbeError(f"precision: must be auto, bf16 or fp32, got {precision!r}")
    return autocast_dtype(precision, torch.device(device))


@contextlib.contextmanager
def fast_inference(model: nn.Module, precision: str = "auto") -> Iterator[None]:
    """Runs `model` (an ImageGPT or a module holding one) for inference as training runs it: in eval
    mode, under `torch.inference_mode`, autocast to `feature_dtype(precision)` and through the attention
    backend `attention.select` picks for that (igpt's CPU bf16 kernel where it applies, else SDPA); the
    model's mode and attention are put back afterwards."""
    import torch  # heavy: torch

    from igpt_core import attention  # heavy: registers torch ops
    from igpt_core.model import CausalSelfAttention  # heavy: torch

    device = next(model.parameters()).device
    dtype = feature_dtype(precision, device)
    layers = [module for module in model.modules() if isinstance(module, CausalSelfAttention)]
    before = [layer.fused_attention for layer in layers]
    was_training = model.training
    attention.select(model, device=device, dtype=dtype, inference=True)
    model.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        model.train(was_training)
        for layer, fused in zip(layers, before, strict=True):
            layer.fused_attention = fused


COMPILE_MIN_IMAGES = 20_000
"""`extract_features(compile=None)` compiles the forward pass from this many images up. Compiling took
~10 s and more than doubled the rate after it (tiny preset, batch 16, bf16: 151 -> 345 images/s on 2
cores), so it pays off from a few thousand images; the margin covers a cold compiler cache."""


def extract_features(
    model: ImageGPT,
    tokens: np.ndarray,
    layers: list[int],
    *,
    batch_size: int = 64,
    progress: bool = False,
    precision: str = "auto",
    desc: str = "features",
    compile: bool | None = None,
) -> dict[int, np.ndarray]:
    """Mean-pooled attention inputs of `layers`, float32 (N, n_embd) each, all from one forward pass per batch.

    Each pass stops at the deepest requested block (`ImageGPT.features`) and runs under `fast_inference`:
    bf16 where the hardware has it natively (`precision` auto), through the training attention backend.
    In fp32 the features are those of a plain forward pass. `progress` shows a bar of images done.

    `compile` runs the pass through `torch.compile` (None: from `COMPILE_MIN_IMAGES` images up), which
    fuses the blocks' norms, activations and casts. Every batch then has `batch_size` rows (the last one
    padded with copies of its last image, whose features are dropped), so one graph serves them all. If
    compiling fails, a warning says why and the pass runs uncompiled.
    """
    import torch  # heavy: torch

    from igpt_core.model import inputs_from_tokens  # heavy: torch

    device = next(model.parameters()).device
    if compile is None:
        compile = len(tokens) >= COMPILE_MIN_IMAGES
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    with (
        fast_inference(model, precision),
        tqdm(total=len(tokens), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        forward = _compiled_features(model) if compile else model.features
        for start in range(0, len(tokens), batch_size):
            rows = tokens[start : start + batch_size]
            if compile and len(rows) < batch_size:  # the graph's shape: pad with the last image
                rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), axis=0)])
            batch = torch.from_numpy(rows.astype(np.int64)).to(device)
            inputs, _ = inputs_from_tokens(batch, model.config.start_token)
            try:
                feats = forward(inputs, layers)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run the plain pass instead
                if forward is model.features:
                    raise
                logger.warning(
                    "igpt: torch.compile of feature extraction failed, running uncompiled (%s)", err
                )
                forward = model.features
                feats = forward(inputs, layers)
            done = min(batch_size, len(tokens) - start)
            for layer in layers:
                out[layer].append(feats[layer][:done].float().cpu().numpy())
            bar.update(done)
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}


def _compiled_features(model: ImageGPT) -> Any:
    """`model.features` through torch.compile, static shapes (extract_features keeps every batch's)."""
    import torch  # heavy: torch

    return torch.compile(model.features, dynamic=False)


def pixel_features(tokens: np.ndarray, palette: Palette, resolution: int) -> np.ndarray:
    """The dequantized R x R x 3 pixels of each image in [-1, 1], float32 (N, 3 R^2): the raw-pixel baseline."""
    images = palette.dequantize(tokens, resolution)
    return (images.reshape(len(tokens), -1).astype(np.float32) / 127.5) - 1.0

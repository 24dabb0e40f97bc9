"""The C++ parts, built on first use: the CPU decode step and the CPU bf16 attention kernel.

Two extensions, each with a PyTorch fallback:
- `csrc/decode_step.cpp`: `generation.generate` on a CPU in float32 calls `NativeDecoder` when
  `decode_extension()` has a module: the same arithmetic as `generation.decode_step`, in one call per
  token instead of ~100 small kernels.
- `csrc/attention.cpp`: causal attention forward and backward in bf16 on CPUs with AVX512-BF16, which
  training under CPU bf16 autocast takes instead of PyTorch's CPU flash kernel once
  `attention.select` installs it (`igpt_core/attention.py`).

The first use in an environment compiles one (about 30 s; needs a C++ compiler, Python headers and
ninja, which the `ninja` dependency provides) into torch's extension cache ($TORCH_EXTENSIONS_DIR, by
default ~/.cache/torch_extensions), named by a digest of the source, torch's version and this CPU (it is
built with -march=native). When a build fails, a warning says why and the PyTorch path is used.
IGPT_NATIVE=0 turns both off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from igpt_core.model import FoldedWeights, ImageGPT, KVCache

_NINJA_BIN_DIR: str | None
try:  # the pip `ninja` wheel; a system ninja on PATH does as well
    from ninja import BIN_DIR as _NINJA_BIN_DIR
except ImportError:
    _NINJA_BIN_DIR = None

logger = logging.getLogger(__name__)

ENV = "IGPT_NATIVE"
MAX_HEAD_DIM = 256  # decode_step.cpp's kMaxHeadDim
CSRC = Path(__file__).with_name("csrc")
# kind -> (source, what is used when it cannot be built)
SOURCES = {
    "decode": (CSRC / "decode_step.cpp", "native decode step unavailable, using the PyTorch step"),
    "attention": (CSRC / "attention.cpp", "native attention unavailable, using PyTorch's attention"),
}
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def decode_extension() -> ModuleType | None:
    """The compiled decode step, or None when IGPT_NATIVE=0 or it cannot be built (warned once)."""
    return _extension("decode")


def attention_extension() -> ModuleType | None:
    """The compiled bf16 attention kernel, or None when IGPT_NATIVE=0, the CPU has no AVX512-BF16 (the
    kernel's instructions) or it cannot be built (warned once)."""
    if not cpu_has_avx512_bf16():
        return None
    module = _extension("attention")
    return module if module is not None and module.available() else None


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def _extension(kind: str) -> ModuleType | None:
    if not enabled():
        return None
    with _lock:
        if kind not in _loaded:
            try:
                _loaded[kind] = _build(kind)
            except Exception as err:  # no compiler, no headers, no ninja: the PyTorch path still works
                logger.warning("igpt: %s (%s)", SOURCES[kind][1], err)
                _loaded[kind] = None
        return _loaded[kind]


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs AVX512-BF16 (with AVX512BW), read from torch's probe."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private; absent means no
    return bool(probe()) if probe is not None else False


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its flags (a shared cache may serve several)."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(wanted)))
    return platform.processor() or platform.machine()


def _build(kind: str) -> ModuleType:
    from torch.utils.cpp_extension import load  # heavy: torch's C++ builder, needed only to build

    source = SOURCES[kind][0]
    digest = hashlib.sha256()
    for part in (source.read_bytes(), torch.__version__.encode(), _cpu_identity().encode()):
        digest.update(part)
    name = f"igpt_{kind}_{digest.hexdigest()[:16]}"
    logger.info("igpt: loading the native %s kernel %s (the first use builds it, ~30 s)", kind, name)
    with _ninja_on_path():
        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; the pip `ninja` wheel's binary is not there unless the venv is active."""
    bin_dir = _NINJA_BIN_DIR
    before = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in before.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


class NativeDecoder:
    """Decode steps through the C++ extension for one generation, continuing a prefilled `KVCache`.

    Keys are copied out in tiles of 64 positions, each tile transposed: (L, B, H, ceil(T / 64), D, 64)
    (see decode_step.cpp); each matrix is transposed to (in, out) and packed into zero-padded panels of 64
    output columns, (ceil(out / 64), in, 64), once. Call `step` under `torch.inference_mode()`.
    """

    TILE = 64  # decode_step.cpp's kTile
    PANEL = 64  # decode_step.cpp's kPanel

    def __init__(self, module: ModuleType, model: ImageGPT, cache: KVCache, weights: FoldedWeights) -> None:
        layers, head = weights
        self.module, self.cache = module, cache
        self.eps = model.config.layer_norm_eps
        self.wte = model.transformer.wte.weight.contiguous()
        self.wpe = model.transformer.wpe.weight.contiguous()
        L, _, B, H, T, D = cache.kv.shape
        tiles, filled = -(-T // self.TILE), cache.length
        # zeros: the last tile's columns past T are multiplied (never kept), so they must be finite
        self.keys = cache.kv.new_zeros(L, B, H, tiles, D, self.TILE)
        self.values = cache.kv.new_empty(L, B, H, T, D)
        whole, rest = divmod(filled, self.TILE)  # the prefix: whole tiles, then part of one
        prefix_keys = cache.kv[:, 0, :, :, : whole * self.TILE]  # (L, B, H, whole * TILE, D)
        self.keys[:, :, :, :whole] = prefix_keys.unflatten(3, (whole, self.TILE)).transpose(-2, -1)
        if rest:
            tail = cache.kv[:, 0, :, :, whole * self.TILE : filled]  # (L, B, H, rest, D)
            self.keys[:, :, :, whole, :, :rest] = tail.transpose(-2, -1)
        self.values[:, :, :, :filled] = cache.kv[:, 1, :, :, :filled]
        # the prefix now lives here; the module-layout cache is not read again, so its memory goes now
        # (at preset s, batch 64, R=32 it is 6 GB)
        cache.kv = cache.kv.new_empty(0)
        self.weights = [
            self.panels(tensor) if tensor.dim() == 2 else tensor.contiguous()
            for layer in layers
            for tensor in layer
        ]
        self.head, self.vocab = self.panels(head), head.size(0)

    @classmethod
    def panels(cls, weight: torch.Tensor) -> torch.Tensor:
        """A linear layer's weight (out, in) as (ceil(out / 64), in, 64): each panel a contiguous block of
        64 output columns (in, out) order, zeros past `out`."""
        out, inner = weight.shape
        count = -(-out // cls.PANEL)
        padded = weight.new_zeros(count * cls.PANEL, inner)
        padded[:out] = weight
        return padded.view(count, cls.PANEL, inner).transpose(1, 2).contiguous()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, K) after feeding one token per row (B,) at position `cache.length`."""
        pos = self.cache.length
        logits = self.module.decode_step(
            token,
            pos,
            self.wte,
            self.wpe,
            self.keys,
            self.values,
            self.weights,
            self.head,
            self.vocab,
            self.eps,
        )
        self.cache.length = pos + 1
        return logits


def usable(model: ImageGPT, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this generation can take the native step: CPU, float32, a head size the kernel takes."""
    return device.type == "cpu" and dtype == torch.float32 and model.config.head_dim <= MAX_HEAD_DIM

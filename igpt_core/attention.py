"""The attention backends of `CausalSelfAttention`: SDPA, or igpt's CPU bf16 kernel as a torch op.

Whoever sets a model up for training calls `select(model, device=..., dtype=...)` once, before wrapping
or compiling it: on a CPU with AVX512-BF16, under bf16 autocast (the trainer's default on such CPUs),
with a head size that is a multiple of 16 up to 256 and the extension built (`native.attention_extension`,
which this call builds on first use), every block's attention then calls `fused_causal_attention`
instead of `scaled_dot_product_attention`; elsewhere (GPU, fp32, other CPUs, IGPT_NATIVE=0) SDPA stays.
`use_sdpa(model)` undoes it. The model itself never decides, builds or loads anything.

The op takes the fused projection's output (B, T, 3C) as it is and returns (B, T, C) with heads side by
side, so neither direction needs the head-major copies SDPA's layout costs; its backward returns the
gradient of that same (B, T, 3C) tensor. Registered with `torch.library` (a fake for shapes, autograd
through `_backward`), so autograd and torch.compile both see one op.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from igpt_core import native
from igpt_core.model import CausalSelfAttention

MAX_HEAD_DIM = 256  # attention.cpp's kMaxHeadDim


def _kernel() -> ModuleType:
    module = native.attention_extension()
    if module is None:  # select() built it before installing the op; a direct call may not have asked
        raise RuntimeError("igpt::causal_attention: the native attention kernel is not available")
    return module


@torch.library.custom_op("igpt::causal_attention", mutates_args=(), device_types="cpu")
def _forward(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernel().forward(qkv, heads, scale)
    return out, lse


@_forward.register_fake
def _(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, C3 = qkv.shape
    return qkv.new_empty(B, T, C3 // 3), qkv.new_empty(B, heads, T, dtype=torch.float32)


@torch.library.custom_op("igpt::causal_attention_backward", mutates_args=(), device_types="cpu")
def _backward_op(
    grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    result: torch.Tensor = _kernel().backward(grad.contiguous(), qkv, out, lse, heads, scale)
    return result


@_backward_op.register_fake
def _(
    grad: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    return torch.empty_like(qkv)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    qkv, heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)  # type: ignore[attr-defined]
    ctx.heads, ctx.scale = heads, scale  # type: ignore[attr-defined]


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, None, None]:
    # lse is the kernel's own bookkeeping for this backward; nothing downstream reads it, so grad_lse is
    # None or zeros and contributes nothing
    qkv, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
    return _backward_op(grad_out, qkv, out, lse, ctx.heads, ctx.scale), None, None  # type: ignore[attr-defined]


_forward.register_autograd(_backward, setup_context=_setup_context)


def usable(qkv: torch.Tensor, heads: int) -> bool:
    """Whether `causal_attention` takes this fused projection (B, T, 3C): on a CPU, in bf16, with a head
    size the kernel has. Reads only the tensor's metadata (it neither builds nor loads the kernel)."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 3:
        return False
    return _head_size_fits(qkv.size(-1) // 3, heads)


def _head_size_fits(n_embd: int, heads: int) -> bool:
    head_dim, rest = divmod(n_embd, heads)
    return not rest and 0 < head_dim <= MAX_HEAD_DIM and head_dim % 16 == 0


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's private probe; absent means no)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def select(
    model: nn.Module, *, device: torch.device | str, dtype: torch.dtype | None, inference: bool = False
) -> str:
    """Sets the attention of every block of `model` for running on `device` under autocast `dtype` (None:
    no autocast): "kernel" when igpt's CPU bf16 kernel applies and is built (building it here on first use,
    ~30 s once per environment, warned and skipped when that fails), else "sdpa". Call it before DDP or
    torch.compile wrap the model, so that they see the chosen function.

    `inference` (forward passes only, as `features.fast_inference` runs them): on a CPU with AMX, SDPA,
    whose CPU flash kernel runs its products on AMX tiles and took 15.7 ms to the kernel's 29.5 ms for a
    forward of 16 x 4 heads x 1,025 positions x head size 32 (torch 2.13, 2 cores, Sapphire Rapids)."""
    layers = [module for module in model.modules() if isinstance(module, CausalSelfAttention)]
    # the cheap conditions first: off a bf16 CPU nothing is built or even probed
    use_kernel = (
        bool(layers)
        and torch.device(device).type == "cpu"
        and dtype == torch.bfloat16
        and not (inference and cpu_has_amx())
        and all(_head_size_fits(layer.n_embd, layer.n_head) for layer in layers)
        and native.attention_extension() is not None
    )
    for layer in layers:
        layer.fused_attention = fused_causal_attention if use_kernel else None
    return "kernel" if use_kernel else "sdpa"


def use_sdpa(model: nn.Module) -> None:
    """Puts every block of `model` back on SDPA (what a freshly built model uses)."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.fused_attention = None


def fused_causal_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """What `select` installs: `causal_attention` for what it takes (`usable`), else SDPA, so a model set up
    for bf16 still runs when called outside autocast. The check reads metadata only, so torch.compile
    resolves it while tracing and keeps one op per block in the graph."""
    if usable(qkv, heads):
        return causal_attention(qkv, heads)
    return sdpa_causal_attention(qkv, heads)


def sdpa_causal_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """`CausalSelfAttention`'s own no-cache SDPA path on a fused projection (B, T, 3C) -> (B, T, C)."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def causal_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for a fused projection (B, T, 3C) -> (B, T, C), in bf16."""
    head_dim = qkv.size(-1) // (3 * heads)
    out, _ = _forward(qkv.contiguous(), heads, 1.0 / math.sqrt(head_dim))
    return out

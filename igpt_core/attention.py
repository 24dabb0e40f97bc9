"""Causal self-attention for CPU training in bf16: the C++ kernel (`csrc/attention.cpp`) as a torch op.

`CausalSelfAttention` calls `causal_attention(qkv, heads)` instead of `scaled_dot_product_attention`
when `usable(qkv, heads)`: a CPU with AVX512-BF16, a bf16 `qkv` (what the fused projection gives under
CPU bf16 autocast, the trainer's default on such CPUs), a head size that is a multiple of 16 up to 256,
and the extension built (`native.attention_extension`). Elsewhere (GPU, fp32, other CPUs) SDPA runs.

The op takes the fused projection's output (B, T, 3C) as it is and returns (B, T, C) with heads side by
side, so neither direction needs the head-major copies SDPA's layout costs; its backward returns the
gradient of that same (B, T, 3C) tensor. Registered with `torch.library` (a fake for shapes, autograd
through `_backward`), so autograd and torch.compile both see one op.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from igpt_core import native

MAX_HEAD_DIM = 256  # attention.cpp's kMaxHeadDim


def _kernel() -> ModuleType:
    module = native.attention_extension()
    if module is None:  # usable() said yes in this process, so it is loaded; a direct call may not have asked
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
    """Whether `causal_attention` takes this fused projection (B, T, 3C); builds the kernel on first use."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 3:
        return False
    head_dim, rest = divmod(qkv.size(-1), 3 * heads)
    if rest or head_dim == 0 or head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return False
    return _kernel_ready()


# torch.compile evaluates this once while tracing and keeps the answer in the graph: tracing into the
# build (file reads, hashing, a lock, torch's CPU probe) would break the graph at every block.
@torch.compiler.assume_constant_result
def _kernel_ready() -> bool:
    return native.attention_extension() is not None


def causal_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for a fused projection (B, T, 3C) -> (B, T, C), in bf16."""
    head_dim = qkv.size(-1) // (3 * heads)
    out, _ = _forward(qkv.contiguous(), heads, 1.0 / math.sqrt(head_dim))
    return out

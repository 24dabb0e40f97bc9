"""The ImageGPT transformer in one file: layer norm -> attention -> MLP -> block -> model.

Weights are laid out like transformers' `ImageGPTForCausalImageModeling` (same parameter names; their
Conv1D matrices are stored transposed), so `hf.py` converts checkpoints with a transpose and nothing else.
Shapes: B batch, T positions, C = n_embd, H heads, D = head_dim, K palette colours (start token = K).

This file imports only torch and the config: decoding lives in `generation.py`, transformers interop in
`hf.py`, and the CPU attention kernel in `attention.py`, whose `select` installs it into a model that is
being set up for training (`forward` itself never builds or loads anything).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from igpt_core.config import ModelConfig

QUICK_GELU = 1.702  # quick-gelu's slope: h * sigmoid(1.702 h)

# causal attention of a fused projection (B, T, 3C) with `heads` heads -> (B, T, C), heads side by side
FusedAttention = Callable[[torch.Tensor, int], torch.Tensor]
# per block (w_qkv, b_qkv, w_att, b_att, w_fc, b_fc, w_out, b_out), then the head: see ImageGPT.folded
FoldedWeights = tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]


class LayerNorm(nn.Module):
    """iGPT's layer norm: no mean subtraction and no bias, `x / sqrt(mean(x^2) + eps) * weight`."""

    def __init__(self, n_embd: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rms_norm is exactly this formula, as one fused kernel instead of five elementwise ops
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for positions already seen, filled left to right during generation."""

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, device: Any, dtype: torch.dtype
    ) -> None:
        # keys and values side by side, so one copy per layer stores both
        shape = (config.n_layer, 2, batch, config.n_head, max_len, config.head_dim)
        self.kv = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored so far (the same for every layer once a forward pass ends)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        # the no-cache, no-dropout path's attention when not SDPA: igpt_core.attention.select sets it
        # (the CPU bf16 kernel) while a model is set up for training; None is SDPA
        self.fused_attention: FusedAttention | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        fused = self.c_attn(x)  # (B, T, 3C): q | k | v, each with the heads side by side, with bias
        dropout = self.dropout if self.training else 0.0
        if cache is None and dropout == 0.0 and self.fused_attention is not None:
            # the selected backend reads the fused layout as it is: no head-major copies either way
            return self.resid_dropout(self.c_proj(self.fused_attention(fused, self.n_head)))
        qkv = fused.view(B, T, 3, self.n_head, C // self.n_head)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = qkv.unbind(0)  # (B, H, T, D) each
        # SDPA scales scores by 1/sqrt(D) and picks a fused kernel (flash / memory-efficient) when it can
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            start, end = cache.length, cache.length + T
            cache.kv[layer, :, :, :, start:end] = qkv[1:]
            k, v = cache.kv[layer, :, :, :, :end].unbind(0)  # (B, H, end, D) each
            # (one position at a time during generation goes through igpt_core.generation instead)
            if start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # a chunk after a cached prefix: causal within the chunk, full view of the past
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_fc weight, c_fc bias, c_proj weight, c_proj bias) with quick-gelu's 1.702 moved into them."""
        return (
            self.c_fc.weight * QUICK_GELU,
            self.c_fc.bias * QUICK_GELU,
            self.c_proj.weight / QUICK_GELU,
            self.c_proj.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quick-gelu h * sigmoid(1.702 h), the released checkpoints' activation, is silu(1.702 h) / 1.702:
        # one fused kernel each way instead of three. Both scalings ride on the weights (n_embd * n_inner
        # numbers) instead of the activations (B * T * n_inner), and gradients flow through them alike.
        w_fc, b_fc, w_proj, b_proj = self.folded()
        h = F.silu(F.linear(x, w_fc, b_fc))  # (B, T, n_inner)
        return self.dropout(F.linear(h, w_proj, b_proj))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))

    def folded(self) -> tuple[torch.Tensor, ...]:
        """The block's matrices with its norms' weights folded in, for code that runs the block by hand.

        (w_qkv, b_qkv, w_att, b_att, w_fc, b_fc, w_out, b_out): each norm's weight scales the columns of
        the matrix that reads its output (`linear(n * w, W) = linear(n, W * w)`) and quick-gelu's scale
        rides on the MLP (`MLP.folded`), so with `r(x) = x / sqrt(mean(x^2) + eps)` the block is
        `x += linear(attn(linear(r(x), w_qkv, b_qkv)), w_att, b_att)`, then
        `x += linear(silu(linear(r(x), w_fc, b_fc)), w_out, b_out)`.
        """
        w_fc, b_fc, w_out, b_out = self.mlp.folded()
        return (
            (self.attn.c_attn.weight * self.ln_1.weight).contiguous(),
            self.attn.c_attn.bias,
            self.attn.c_proj.weight,
            self.attn.c_proj.bias,
            (w_fc * self.ln_2.weight).contiguous(),
            b_fc,
            w_out.contiguous(),
            b_out,
        )


class Transformer(nn.Module):
    """Embeddings, blocks and final norm; a module of its own so parameter names match transformers'."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size + 1, config.n_embd)  # row K is the start token
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_eps)

    def blocks(self) -> list[Block]:
        return list(self.h)  # type: ignore[arg-type]


class ImageGPT(nn.Module):
    """Decoder-only transformer over palette tokens; inputs start with the start token K."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied, no start-token logit
        self.apply(self._init_weights)
        # GPT-2: residual projections shrink with depth so the residual stream's variance stays put
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def blocks(self) -> list[Block]:
        return self.transformer.blocks()

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token plus position embeddings (B, T, C) of token ids (B, T) at positions start .. start + T - 1."""
        pos = torch.arange(start, start + idx.size(1), device=idx.device)  # (T,)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised residual stream (B, T, C), what `lm_head` reads.

        With a cache, `idx` continues the sequence at position `cache.length`: its keys and values are
        stored and `cache.length` advances by T (a prefill, or a chunk after one).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx: expected token ids of shape (B, T), got {tuple(idx.shape)}")
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"idx: {start + T} positions exceed block_size={self.config.block_size}")
        x = self.embed(idx, start)  # (B, T, C)
        for layer, block in enumerate(self.blocks()):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, K) for token ids (B, T) that begin with the start token."""
        return self.lm_head(self.hidden(idx))

    def folded(self) -> FoldedWeights:
        """Every block's `Block.folded` weights, and `lm_head`'s with ln_f's weight folded into it."""
        head = (self.lm_head.weight * self.transformer.ln_f.weight).contiguous()
        return [block.folded() for block in self.blocks()], head

    def features(self, idx: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Per requested block, its attention input (ln_1 output) mean-pooled over positions: (B, C).

        Stops at the deepest requested block. Gradients flow, so fine-tuning can use it; wrap in
        `torch.no_grad()` for plain extraction.
        """
        wanted = sorted(set(layers))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.config.n_layer:
            raise ValueError(f"layers: need block indices in [0, {self.config.n_layer}), got {layers}")
        if idx.dim() != 2 or idx.size(1) > self.config.block_size:
            raise ValueError(f"idx: expected (B, T<={self.config.block_size}), got {tuple(idx.shape)}")
        x = self.embed(idx)
        out: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.blocks()[: wanted[-1] + 1]):
            if layer in wanted:
                out[layer] = block.ln_1(x).mean(dim=1)  # (B, C)
            if layer == wanted[-1]:
                break  # the deepest feature needs only this block's norm, not the block
            x = block(x)
        return out

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW that decays matrices only (not norms, biases or embeddings); fused where supported."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_matrix = param.dim() == 2 and not name.startswith(("transformer.wte", "transformer.wpe"))
            (decay if is_matrix else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # the fused kernel does the whole update in one pass per tensor; it exists for CPU and CUDA
        fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def save(self, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Writes model.safetensors and config.json (the model config plus `extra` keys) into `out_dir`."""
        from igpt_core import checkpoint  # cycle: checkpoint -> model

        return checkpoint.save_model(self, out_dir, extra)

    @classmethod
    def load(cls, checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> ImageGPT:
        """A model from a folder written by `save` (unknown config.json keys are ignored), in eval mode."""
        from igpt_core import checkpoint  # cycle: checkpoint -> model

        return checkpoint.load_model(checkpoint_dir, map_location)


def inputs_from_tokens(tokens: torch.Tensor, start_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (B, R*R) -> model inputs `[K, t0 .. t(R*R-2)]` and targets `[t0 .. t(R*R-1)]`, both int64."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.size(1) < 1:
        raise ValueError(f"tokens: expected shape (B, R*R), got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: expected integer ids, got {tokens.dtype}")
    targets = tokens.long()  # uint16 shards arrive here; embeddings need int64
    if targets.numel() and (targets.min() < 0 or targets.max() >= start_token):
        raise ValueError(f"tokens: ids must be in [0, {start_token}), got [{targets.min()}, {targets.max()}]")
    start = torch.full((targets.size(0), 1), start_token, dtype=torch.long, device=targets.device)
    return torch.cat([start, targets[:, :-1]], dim=1), targets

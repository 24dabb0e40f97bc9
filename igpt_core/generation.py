"""Autoregressive generation for ImageGPT: prefill a KV cache, then one position per step, then sampling.

`generate(model, prefix, n)` is the entry point. The prefill runs through the model's modules
(`ImageGPT.hidden` with a `KVCache`); each later position runs through a decode step written for one
query per row: the C++ step (`native.py`) on a CPU in float32 when it builds, else `decode_step` below.
Both read the tensors `decode_weights` prepares once per generation and compute the same logits (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from igpt_core import native
from igpt_core.model import FoldedWeights, ImageGPT, KVCache

# per block (w_qkv, b_qkv, w_att, b_att, w_fc, b_fc, w_out, b_out) with norms and quick-gelu folded, and the head
DecodeWeights = FoldedWeights


@torch.no_grad()
def generate(
    model: ImageGPT,
    prefix: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extends `prefix` (B, T0) by `max_new_tokens` sampled tokens -> (B, T0 + max_new_tokens).

    The prefix is run in one pass that fills a KV cache; each new token then costs one position.
    temperature 0 is greedy decoding; top_k and top_p narrow the choice as in transformers. The sequence
    may reach block_size + 1 tokens: the last one is predicted but never fed. Runs in eval mode and
    restores the previous mode.
    """
    check_sampling(temperature, top_k, top_p)
    if prefix.dim() != 2 or prefix.size(1) < 1:
        raise ValueError(f"prefix: expected shape (B, T0) with T0 >= 1, got {tuple(prefix.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be non-negative, got {max_new_tokens}")
    B, T0 = prefix.shape
    total = T0 + max_new_tokens
    if total - 1 > model.config.block_size:
        raise ValueError(
            f"max_new_tokens: prefix {T0} + {max_new_tokens} new tokens need {total - 1} positions, "
            f"block_size is {model.config.block_size}"
        )
    if prefix.min() < 0 or prefix.max() > model.config.start_token:
        raise ValueError(f"prefix: token ids must be in [0, {model.config.start_token}]")
    out = torch.empty(B, total, dtype=torch.long, device=prefix.device)
    out[:, :T0] = prefix
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        # inference mode skips autograd's view and version bookkeeping, a real share of a decode step
        with torch.inference_mode():
            weight = model.lm_head.weight
            cache = KVCache(model.config, B, total - 1, weight.device, weight.dtype)
            weights = decode_weights(model)
            tokens = out.clone()
            hidden = model.hidden(tokens[:, :T0], cache)[:, -1]  # (B, C): only the last position matters
            logits = model.lm_head(hidden)  # (B, K)
            step = step_function(model, cache, weights)
            for i in range(T0, total):
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                tokens[:, i] = token
                if i + 1 < total:
                    logits = step(token)
        out.copy_(tokens)  # a normal tensor for the caller (inference tensors refuse later autograd use)
    finally:
        model.train(was_training)
    return out


def step_function(
    model: ImageGPT, cache: KVCache, weights: DecodeWeights
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode step for this generation: the C++ one (igpt_core/native.py) on a CPU in float32
    when it builds, else `decode_step`. Both compute the same logits (to float rounding, tested)."""
    if native.usable(model, cache.kv.device, cache.kv.dtype):
        module = native.decode_extension()
        if module is not None:
            return native.NativeDecoder(module, model, cache, weights).step
    return lambda token: decode_step(model, token, cache, weights)


def decode_weights(model: ImageGPT) -> DecodeWeights:
    """Per block, the tensors `decode_step` reads, and the output head; computed once per generation.

    These are `ImageGPT.folded()`: each norm's weight folded into the matrix that reads its output and
    quick-gelu's scale into the MLP, so a step spends no kernels on either.
    """
    return model.folded()


def decode_step(model: ImageGPT, token: torch.Tensor, cache: KVCache, weights: DecodeWeights) -> torch.Tensor:
    """Next-token logits (B, K) after feeding one token per row (B,) at position `cache.length`.

    The same computation as `ImageGPT.hidden` + `lm_head` for one position, written for the decode loop:
    a decode step is a few hundred small kernels over (B, C) rows, where module calls, 3-D views and
    per-step weight scaling cost as much as the arithmetic. One query sees every cached position, so
    attention needs no mask and is two plain matmuls (faster on CPU than SDPA's flash kernel, which
    tiles for many queries). Call under `torch.inference_mode()`.
    """
    pos = cache.length
    if pos >= model.config.block_size:
        raise ValueError(f"cache: all {model.config.block_size} positions are already used")
    B, C, H = token.size(0), model.config.n_embd, model.config.n_head
    D, eps = C // H, model.config.layer_norm_eps
    scale = 1.0 / math.sqrt(D)
    layers, head = weights

    def norm(x: torch.Tensor) -> torch.Tensor:  # the layer norm less its weight (folded, see above)
        # F.rms_norm(x, (C,), None, eps) written out: the same tokens, but rms_norm measured 5-10% more
        # CPU per image on these (B, C) rows. Statistics in float32 whatever the model's dtype, as
        # rms_norm does (no-ops for float32).
        rstd = x.float().square().mean(dim=-1, keepdim=True).add_(eps).rsqrt_()
        return x * rstd.to(x.dtype)

    x = F.embedding(token, model.transformer.wte.weight) + model.transformer.wpe.weight[pos]  # (B, C)
    for layer, (w_qkv, b_qkv, w_att, b_att, w_fc, b_fc, w_out, b_out) in enumerate(layers):
        qkv = F.linear(norm(x), w_qkv, b_qkv)  # (B, 3C): q | k | v
        kv = cache.kv[layer]  # (2, B, H, max_len, D)
        kv[:, :, :, pos] = qkv[:, C:].view(B, 2, H, D).transpose(0, 1)
        k, v = kv[:, :, :, : pos + 1].unbind(0)  # (B, H, pos + 1, D) each
        q = qkv[:, :C].view(B, H, 1, D) * scale
        y = ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).view(B, C)  # heads side by side
        x = x + F.linear(y, w_att, b_att)
        h = F.silu(F.linear(norm(x), w_fc, b_fc))  # quick-gelu, see MLP
        x = x + F.linear(h, w_out, b_out)
    cache.length = pos + 1
    return F.linear(norm(x), head)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row of logits (B, K) -> (B,): temperature, then top-k, then top-p (as transformers)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # (B, k) token ids once top-k / top-p have narrowed and ranked the choice
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k), best first
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the best one stays)
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    probs = logits.softmax(dim=-1)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, in three
    # kernels and no host sync (multinomial validates its input and sums cumulatively every call)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)

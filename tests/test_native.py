"""The C++ decode step (igpt_core/native.py): the PyTorch step's logits, and a fallback when it cannot build.

The extension is built on first use (~30 s once per environment). A machine where it must not be built
runs the suite with IGPT_NATIVE=0; these tests then skip, and every other generation test covers the
PyTorch step.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from igpt_core import generation, native
from igpt_core.config import ModelConfig
from igpt_core.generation import generate
from igpt_core.model import ImageGPT, KVCache, inputs_from_tokens


def _extension():
    if os.environ.get(native.ENV, "1").strip() == "0":
        pytest.skip("IGPT_NATIVE=0 turns the native decode step off")
    module = native.decode_extension()
    assert module is not None, "the native decode step did not build: see the warning logged above"
    return module


def _model(config: ModelConfig, seed: int = 0) -> ImageGPT:
    torch.manual_seed(seed)
    model = ImageGPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # logits far from uniform
    return model


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# head sizes 16 and 32 (one block of columns), 48 (a block of 32 and one of 16), 12 (the plain loop); prefixes
# inside the first 64-position key tile, filling exactly one, and one tile and part of the next
@pytest.mark.parametrize(
    ("n_embd", "n_head", "resolution", "prefix"),
    [(32, 2, 5, 4), (64, 2, 5, 4), (48, 1, 5, 4), (24, 2, 5, 4), (32, 2, 10, 64), (32, 2, 10, 70)],
)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_native_steps_match_the_pytorch_steps_and_the_full_forward(
    n_embd, n_head, resolution, prefix, n_threads, threads
):
    module = _extension()
    threads(n_threads)
    config = ModelConfig(vocab_size=16, resolution=resolution, n_layer=3, n_head=n_head, n_embd=n_embd)
    model = _model(config)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (3, config.block_size), generator=g)  # 3 rows: uneven split
    inputs, _ = inputs_from_tokens(tokens, config.start_token)
    with torch.inference_mode():
        reference = model(inputs)  # (3, T, K)
        weights = generation.decode_weights(model)
        caches = [KVCache(config, 3, config.block_size, "cpu", torch.float32) for _ in range(2)]
        for cache in caches:
            model.hidden(inputs[:, :prefix], cache)
        decoder = native.NativeDecoder(module, model, caches[0], weights)
        assert caches[0].kv.numel() == 0  # the module-layout copy of the prefix is released
        fast = [decoder.step(inputs[:, t]) for t in range(prefix, config.block_size)]
        slow = [
            generation.decode_step(model, inputs[:, t], caches[1], weights)
            for t in range(prefix, config.block_size)
        ]
        assert caches[0].length == caches[1].length == config.block_size
        torch.testing.assert_close(torch.stack(fast, 1), torch.stack(slow, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.stack(fast, 1), reference[:, prefix:], rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="outside the cache"):
            decoder.step(inputs[:, 0])


def test_panels_hold_each_block_of_64_output_columns_zero_padded():
    weight = torch.arange(70 * 3, dtype=torch.float32).view(70, 3)  # a linear layer's (out, in)
    panels = native.NativeDecoder.panels(weight)
    assert panels.shape == (2, 3, 64) and panels.is_contiguous()
    torch.testing.assert_close(panels[0], weight[:64].t(), rtol=0, atol=0)
    torch.testing.assert_close(panels[1, :, :6], weight[64:].t(), rtol=0, atol=0)
    assert not panels[1, :, 6:].any()


@pytest.mark.parametrize("rows", [1, 4, 9])  # whole blocks of 4 rows, and 2 blocks and one row more
def test_native_steps_match_the_pytorch_steps_for_batches_and_a_head_of_two_panels(rows, threads):
    module = _extension()
    threads(2)
    config = ModelConfig(vocab_size=80, resolution=4, n_layer=2, n_head=2, n_embd=32)  # head: 2 panels
    model = _model(config)
    tokens = torch.randint(0, 80, (rows, config.block_size), generator=torch.Generator().manual_seed(2))
    inputs, _ = inputs_from_tokens(tokens, config.start_token)
    with torch.inference_mode():
        weights = generation.decode_weights(model)
        caches = [KVCache(config, rows, config.block_size, "cpu", torch.float32) for _ in range(2)]
        for cache in caches:
            model.hidden(inputs[:, :1], cache)
        decoder = native.NativeDecoder(module, model, caches[0], weights)
        for t in range(1, config.block_size):
            fast = decoder.step(inputs[:, t])
            slow = generation.decode_step(model, inputs[:, t], caches[1], weights)
            assert fast.shape == (rows, 80)
            torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


class _CountingDecoder(native.NativeDecoder):
    steps = 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        type(self).steps += 1
        return super().step(token)


def test_generate_takes_the_native_step_and_draws_what_the_pytorch_step_draws(monkeypatch, threads):
    _extension()
    threads(2)
    monkeypatch.setattr(native, "NativeDecoder", _CountingDecoder)
    monkeypatch.setattr(_CountingDecoder, "steps", 0)
    model = _model(ModelConfig(vocab_size=16, resolution=6, n_layer=2, n_head=2, n_embd=64))
    prefix = torch.full((5, 1), model.config.start_token)
    fast = generate(model, prefix, 36, temperature=0.0)
    assert _CountingDecoder.steps == 35  # every token after the first, which the prefill predicts
    seeded = generate(model, prefix, 36, top_k=4, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv(native.ENV, "0")
    assert torch.equal(generate(model, prefix, 36, temperature=0.0), fast)
    assert torch.equal(
        generate(model, prefix, 36, top_k=4, generator=torch.Generator().manual_seed(3)), seeded
    )
    assert _CountingDecoder.steps == 70  # unchanged: with IGPT_NATIVE=0 both ran the PyTorch step


def test_generation_falls_back_to_the_pytorch_step_when_the_build_fails(monkeypatch, caplog):
    def broken_build(kind: str):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_build", broken_build)
    model = _model(ModelConfig(vocab_size=16, resolution=4, n_layer=2, n_head=2, n_embd=32))
    prefix = torch.full((2, 1), model.config.start_token)
    with caplog.at_level(logging.WARNING, logger="igpt_core.native"):
        out = generate(model, prefix, 16, temperature=0.0)
        generate(model, prefix, 16, temperature=0.0)
    warnings = [r.getMessage() for r in caplog.records if "native decode step unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0]  # once, with the reason
    monkeypatch.setenv(native.ENV, "0")
    assert torch.equal(generate(model, prefix, 16, temperature=0.0), out)

"""Feature extraction: the layer choice, one pass for every layer, fp32 as a plain forward pass, bf16 close
to it, and the precision check, on a tiny model at random initialisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from igpt_core.config import ModelConfig
from igpt_core.features import ProbeError, extract_features, resolve_layers

SIDE = 8
COLOURS = 16
N_LAYER = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from igpt_core.model import ImageGPT

    folder = tmp_path_factory.mktemp("features-ckpt")
    torch.manual_seed(1)
    ImageGPT(ModelConfig(vocab_size=COLOURS, resolution=SIDE, n_layer=N_LAYER, n_head=2, n_embd=32)).save(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """Ten images of palette indices (the features do not depend on what the images show)."""
    return np.random.default_rng(0).integers(0, COLOURS, size=(10, SIDE * SIDE)).astype(np.uint16)


def test_layer_choice() -> None:
    assert resolve_layers(None, 6) == [3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ProbeError, match="layer"):
        resolve_layers(3, 3)


def test_one_pass_over_all_layers_matches_single_layer_passes(checkpoint: Path, tokens: np.ndarray) -> None:
    from igpt_core.model import ImageGPT

    model = ImageGPT.load(checkpoint)
    every = extract_features(model, tokens, [0, 1, 2], batch_size=4)
    for layer in range(N_LAYER):
        assert every[layer].shape == (10, 32)
        np.testing.assert_allclose(
            every[layer], extract_features(model, tokens, [layer], batch_size=7)[layer], atol=1e-5
        )
    assert not np.allclose(every[0], every[2])


def test_fp32_features_are_a_plain_forward_pass_and_the_model_is_left_as_found(
    checkpoint: Path, tokens: np.ndarray
) -> None:
    import torch

    from igpt_core.model import ImageGPT, inputs_from_tokens

    model = ImageGPT.load(checkpoint).train()
    tokens = tokens[:6]
    features = extract_features(model, tokens, [1], batch_size=4, precision="fp32")[1]
    # by hand: block 0, then block 1's norm, mean over positions, on the whole batch at once
    with torch.no_grad():
        x = model.embed(inputs_from_tokens(torch.from_numpy(tokens.astype(np.int64)), COLOURS)[0])
        expected = model.blocks()[1].ln_1(model.blocks()[0](x)).mean(dim=1)
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)
    assert model.training and all(block.attn.fused_attention is None for block in model.blocks())


def test_bf16_features_are_close_to_fp32_ones(checkpoint: Path, tokens: np.ndarray) -> None:
    from igpt_core.model import ImageGPT

    model = ImageGPT.load(checkpoint)
    tokens = tokens[:8]
    fp32 = extract_features(model, tokens, [2], precision="fp32")[2]
    bf16 = extract_features(model, tokens, [2], precision="bf16")[2]
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # autocast did run in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max())


def test_an_unknown_precision_is_refused_naming_the_option(checkpoint: Path, tokens: np.ndarray) -> None:
    from igpt_core.model import ImageGPT

    with pytest.raises(ProbeError, match="precision: must be auto, bf16 or fp32"):
        extract_features(ImageGPT.load(checkpoint), tokens[:2], [0], precision="fp16")


def test_compiled_features_match_the_plain_pass_with_a_padded_last_batch(
    checkpoint: Path, tokens: np.ndarray
) -> None:
    """torch.compile fuses the blocks' elementwise work; in fp32 the features stay those of the plain
    pass, and the last batch (10 images in batches of 4: 2 rows of padding) keeps only its own rows."""
    from igpt_core.model import ImageGPT

    model = ImageGPT.load(checkpoint)
    plain = extract_features(model, tokens, [0, 2], batch_size=4, precision="fp32", compile=False)
    compiled = extract_features(model, tokens, [0, 2], batch_size=4, precision="fp32", compile=True)
    for layer in (0, 2):
        assert compiled[layer].shape == (10, 32)
        np.testing.assert_allclose(compiled[layer], plain[layer], atol=1e-5)


def test_a_compile_failure_is_warned_and_the_plain_pass_runs(
    checkpoint: Path, tokens: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from igpt_core import features
    from igpt_core.model import ImageGPT

    def broken(model):
        def forward(inputs, layers):
            raise RuntimeError("no C++ compiler (injected)")

        return forward

    monkeypatch.setattr(features, "_compiled_features", broken)
    model = ImageGPT.load(checkpoint)
    with caplog.at_level("WARNING", logger="igpt_core.features"):
        got = extract_features(model, tokens, [1], batch_size=4, precision="fp32", compile=True)
    assert "torch.compile of feature extraction failed" in caplog.text and "(injected)" in caplog.text
    want = extract_features(model, tokens, [1], batch_size=4, precision="fp32", compile=False)
    np.testing.assert_array_equal(got[1], want[1])


def test_large_extractions_compile_by_default(
    checkpoint: Path, tokens: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from igpt_core import features
    from igpt_core.model import ImageGPT

    compiled: list[object] = []

    def spy(model):
        compiled.append(model)
        return model.features

    monkeypatch.setattr(features, "_compiled_features", spy)
    model = ImageGPT.load(checkpoint)
    extract_features(model, tokens, [1], batch_size=4)
    assert compiled == []
    monkeypatch.setattr(features, "COMPILE_MIN_IMAGES", len(tokens))
    extract_features(model, tokens, [1], batch_size=4)
    assert compiled == [model]

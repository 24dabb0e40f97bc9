"""The recipe at the paper's larger resolutions: 48x48 (2,304 tokens) and 64x64 (4,096 tokens) go through
palette fit, tokenize, pretrain, sample and probe end to end on the CPU.

A handful of images, a one-block model (d=16) and two optimizer steps per resolution: the claim is that
every stage accepts the long sequences and hands the next stage what it needs, not that the model learns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from igpt_core.config import ModelConfig, ProbeConfig, TrainConfig

# slow: it starts Ray (tokenize, pretrain), as the other end-to-end tests do
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

COLOURS = 8
IMAGES = 12  # per split: three colour classes of four


def _colour_classes(count: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is their dominant channel (red, green, blue), with 30% of pixels noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    base = np.zeros((count, side, side, 3), dtype=np.uint8)
    base[np.arange(count), :, :, labels] = 230
    noise = rng.integers(0, 256, size=base.shape, dtype=np.uint8)
    keep = rng.random((count, side, side, 1)) < 0.7
    return np.where(keep, base, noise).astype(np.uint8), labels


@pytest.mark.parametrize("side", [48, 64])
def test_a_resolution_tokenizes_pretrains_samples_and_probes_end_to_end(
    side: int, tmp_path: Path, ray_local
) -> None:
    from igpt_core.data import load_tokens
    from igpt_core.palette_fit import fit_palette
    from igpt_core.pretrain import pretrain
    from igpt_core.probe import run_probe
    from igpt_core.sample import sample_images
    from igpt_core.sources import open_source
    from igpt_core.tokens import tokenize

    train_images, train_labels = _colour_classes(IMAGES, side, seed=0)
    test_images, test_labels = _colour_classes(IMAGES, side, seed=1)
    palette = fit_palette(train_images, clusters=COLOURS, resolution=side, progress=False)
    palette_dir = tmp_path / "palette"
    palette.save(palette_dir)

    shards = tmp_path / "shards"
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        tokenize(
            open_source(images, labels=labels), palette, shards, resolution=side, split=split, progress=False
        )
    tokens, labels = load_tokens(shards, split="train")
    assert tokens.shape == (IMAGES, side * side) and labels is not None
    np.testing.assert_array_equal(tokens, palette.quantize(train_images))

    model = ModelConfig(vocab_size=COLOURS, resolution=side, n_layer=1, n_head=2, n_embd=16)
    train = TrainConfig(
        steps=2,
        batch_size=2,
        warmup_steps=1,
        log_every=1,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=2,
        workers=1,
        use_gpu=False,
        precision="fp32",
        eval_split="test",
    )
    run = tmp_path / "run"
    result = pretrain(shards, run, model=model, train=train, palette_dir=palette_dir)
    assert result.step == 2 and np.isfinite(result.metrics["loss"])
    assert (result.checkpoint_dir / "model.safetensors").is_file()

    drawn = sample_images(run, n=2, top_k=4, seed=0)
    assert drawn.shape == (2, side, side, 3) and drawn.dtype == np.uint8
    # every pixel of a sample is one of the palette's colours
    assert np.isin(palette.quantize(drawn), np.arange(COLOURS)).all()

    probe = run_probe(run, shards, shards, ProbeConfig(c_grid=(1.0,), val_fraction=0.25), out_dir=None)
    assert probe["counts"]["train"] == IMAGES and probe["counts"]["test"] == IMAGES
    assert probe["feature_dim"] == 16 and probe["baselines"]["raw_pixels"]["feature_dim"] == 3 * side * side
    assert 0.0 <= probe["accuracy"]["test"] <= 1.0

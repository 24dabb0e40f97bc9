"""The checkpoint folder's one loader: `checkpoint.load` gives the model, palette and config that
`ImageGPT.load`, `sample.load_checkpoint` and `read_config` each give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from igpt_core import checkpoint
from igpt_core.config import ModelConfig
from igpt_core.model import ImageGPT
from igpt_core.palette import Palette
from igpt_core.sample import SampleError, load_checkpoint

MODEL = ModelConfig(vocab_size=8, resolution=4, n_layer=1, n_head=2, n_embd=16)


def test_one_loader_reads_what_model_save_and_the_palette_wrote(tmp_path):
    torch.manual_seed(0)
    model = ImageGPT(MODEL)
    model.save(tmp_path, extra={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE]
    loaded, palette, config = checkpoint.load(tmp_path)
    assert palette is None and config["step"] == 3 and config["model_type"] == "igpt"
    assert not loaded.training
    idx = torch.randint(0, 8, (1, 16))
    torch.testing.assert_close(loaded(idx), model.eval()(idx), atol=0, rtol=0)
    torch.testing.assert_close(ImageGPT.load(tmp_path)(idx), loaded(idx), atol=0, rtol=0)
    with pytest.raises(SampleError, match=f"has no {checkpoint.PALETTE_FILE}"):
        load_checkpoint(tmp_path)

    Palette(np.random.default_rng(0).uniform(-1, 1, size=(8, 3)).astype(np.float32)).save(tmp_path)
    _, palette, _ = checkpoint.load(tmp_path)
    assert palette is not None and palette.clusters == 8
    model_from_sample, palette_from_sample = load_checkpoint(tmp_path)
    assert palette_from_sample.digest() == palette.digest()
    torch.testing.assert_close(model_from_sample(idx), loaded(idx), atol=0, rtol=0)


def test_the_loader_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"has no {checkpoint.CONFIG_FILE}"):
        checkpoint.load(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=f"has no {checkpoint.CONFIG_FILE}"):
        checkpoint.read_config(tmp_path)

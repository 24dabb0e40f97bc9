"""Parity with transformers' ImageGPTForCausalImageModeling: import, export, logits, greedy generation.

Reference models are random-initialised from a local ImageGPTConfig (no network) and then perturbed, so
biases and layer-norm weights are not at their trivial init and a mis-mapped tensor shows in the logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from igpt_core import hf
from igpt_core.generation import generate
from igpt_core.model import inputs_from_tokens

transformers = pytest.importorskip("transformers")

SHAPES = {
    # K, R, layers, d, heads, n_inner (None: transformers' default 4 d), eps
    "small": dict(clusters=16, resolution=4, n_layer=2, n_embd=32, n_head=4, n_inner=None, eps=1e-5),
    "odd": dict(clusters=24, resolution=5, n_layer=3, n_embd=48, n_head=3, n_inner=72, eps=1e-6),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_model(shape: str, seed: int = 0):
    spec = SHAPES[shape]
    config = transformers.ImageGPTConfig(
        vocab_size=spec["clusters"] + 1,
        n_positions=spec["resolution"] ** 2,
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_inner=spec["n_inner"],
        layer_norm_epsilon=spec["eps"],
    )
    torch.manual_seed(seed)
    model = transformers.ImageGPTForCausalImageModeling(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:  # wide weights make the greedy choice decisive, far above float rounding
                param.copy_(0.3 * torch.randn_like(param))
    return model


def sequences(model_config, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    clusters = model_config.vocab_size - 1
    tokens = torch.randint(0, clusters, (batch, model_config.n_positions), generator=g)
    return inputs_from_tokens(tokens, clusters)[0]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_matches_transformers(shape, tmp_path):
    reference = reference_model(shape)
    reference.save_pretrained(tmp_path)
    ours = hf.load_hf(tmp_path)
    spec = SHAPES[shape]
    assert ours.config.vocab_size == spec["clusters"] and ours.config.resolution == spec["resolution"]
    assert ours.config.n_inner == (spec["n_inner"] or 4 * spec["n_embd"])

    inputs = sequences(reference.config)
    with torch.no_grad():
        theirs = reference(input_ids=inputs).logits
        mine = ours(inputs)
    assert mine.shape == theirs.shape == (3, spec["resolution"] ** 2, spec["clusters"])
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)

    # features are the normalised input of a block's attention, as transformers' ln_1 computes it
    with torch.no_grad():
        hidden = reference(input_ids=inputs, output_hidden_states=True).hidden_states
        feats = ours.features(inputs, [0, spec["n_layer"] - 1])
        for layer, value in feats.items():
            expected = reference.transformer.h[layer].ln_1(hidden[layer]).mean(dim=1)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_generation_is_token_identical(shape, tmp_path):
    reference = reference_model(shape)
    reference.save_pretrained(tmp_path)
    ours = hf.load_hf(tmp_path)
    start = reference.config.vocab_size - 1
    positions = reference.config.n_positions
    unconditional = torch.full((4, 1), start)
    completion = sequences(reference.config, batch=2)[:, :6]  # start token + 5 known pixels
    for prefix in (unconditional, completion):
        new = positions + 1 - prefix.size(1)  # to the last pixel of the image
        theirs = reference.generate(input_ids=prefix, max_new_tokens=new, do_sample=False, pad_token_id=0)
        mine = generate(ours, prefix, new, temperature=0.0)
        assert mine.shape == (prefix.size(0), positions + 1)
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_loads_in_transformers(shape, tmp_path):
    reference = reference_model(shape, seed=3)
    reference.save_pretrained(tmp_path / "hf")
    ours = hf.load_hf(tmp_path / "hf")
    hf.save_hf(ours, tmp_path / "exported")
    reloaded = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "exported").eval()
    inputs = sequences(reference.config, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, ours(inputs), rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(input_ids=inputs).logits, reference(input_ids=inputs).logits)
    # and back again: an igpt-trained model survives the round trip bit for bit
    again = hf.load_hf(tmp_path / "exported")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_import_rejects_unsupported_variants(tmp_path):
    reference_model("small").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field, value, message in [
        ("activation_function", "gelu", "activation_function"),
        ("n_positions", 15, "not a square"),
        ("model_type", "gpt2", "model_type"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(hf.HFFormatError, match=message):
            hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(hf.HFFormatError, match="do not match config.json"):
        hf.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf(tmp_path / "absent")


def test_openai_palette(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.uniform(-1, 1, size=(512, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centers)
    loaded = hf.read_openai_centers(tmp_path / "kmeans_centers.npy")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, centers)

    np.save(tmp_path / "bad_shape.npy", centers[:, :2])
    with pytest.raises(hf.HFFormatError, match="expected \\(K, 3\\)"):
        hf.read_openai_centers(tmp_path / "bad_shape.npy")
    np.save(tmp_path / "pixels.npy", (centers + 1) * 127.5)
    with pytest.raises(hf.HFFormatError, match="outside \\[-1, 1\\]"):
        hf.read_openai_centers(tmp_path / "pixels.npy")
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(hf.HFFormatError):
        hf.read_openai_centers(tmp_path / "pickled.npy")

    palette_module = pytest.importorskip("igpt_core.palette")
    palette = hf.load_openai_palette(tmp_path / "kmeans_centers.npy")
    assert isinstance(palette, palette_module.Palette)
    assert np.array_equal(palette.centers, centers)


def test_import_reads_sharded_and_legacy_layouts(tmp_path):
    reference = reference_model("small", seed=5)
    inputs = sequences(reference.config)
    with torch.no_grad():
        expected = reference(input_ids=inputs).logits
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    # older hub uploads: pytorch_model.bin with the causal-mask buffers saved beside the weights
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    state = dict(reference.state_dict())
    positions = reference.config.n_positions
    for layer in range(reference.config.n_layer):
        state[f"transformer.h.{layer}.attn.bias"] = torch.ones(1, 1, positions, positions).tril()
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy / "pytorch_model.bin")
    for folder in (tmp_path / "sharded", legacy):
        with torch.no_grad():
            torch.testing.assert_close(hf.load_hf(folder)(inputs), expected, rtol=0, atol=1e-4)

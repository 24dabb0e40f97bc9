"""Hugging Face interop: transformers `ImageGPTForCausalImageModeling` folders and openai palettes.

A transformers folder (the `save_pretrained` layout: config.json + model.safetensors, or the older
pytorch_model.bin) holds the same tensors under the same names as `ImageGPT`; transformers' Conv1D layers
store their matrices as (in, out), the transpose of nn.Linear's (out, in). Reading and writing needs only
safetensors and json, so transformers itself is not required. `load_hf(folder) -> ImageGPT` and
`save_hf(model, folder)` are the two directions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from igpt_core.config import ModelConfig
from igpt_core.model import ImageGPT
from igpt_core.palette import Palette

ARCHITECTURE = "ImageGPTForCausalImageModeling"
# transformers' Conv1D weights: (in, out) on their side, (out, in) on ours
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older transformers versions saved alongside the weights
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias


class HFFormatError(ValueError):
    """A transformers checkpoint that igpt cannot represent (the message names the file and field)."""


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The igpt ModelConfig equivalent to a transformers ImageGPTConfig dict; rejects variants igpt lacks."""

    def field(name: str, default: Any = None) -> Any:
        if name not in hf_config and default is None:
            raise HFFormatError(f"{source}: missing field {name!r}")
        return hf_config.get(name, default)

    model_type = hf_config.get("model_type")
    if model_type != "imagegpt":
        raise HFFormatError(f"{source}: model_type is {model_type!r}, expected 'imagegpt'")
    unsupported = {
        "activation_function": ("quick_gelu", hf_config.get("activation_function", "quick_gelu")),
        "scale_attn_weights": (True, hf_config.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, hf_config.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": (False, hf_config.get("add_cross_attention", False)),
    }
    for name, (wanted, got) in unsupported.items():
        if got != wanted:
            raise HFFormatError(f"{source}: {name}={got!r} is not supported (igpt needs {wanted!r})")
    n_positions = int(field("n_positions"))
    resolution = math.isqrt(n_positions)
    if resolution * resolution != n_positions:
        raise HFFormatError(f"{source}: n_positions={n_positions} is not a square R*R")
    n_embd = int(field("n_embd"))
    n_inner = hf_config.get("n_inner") or 4 * n_embd
    config = ModelConfig(
        vocab_size=int(field("vocab_size")) - 1,  # theirs counts the start token
        resolution=resolution,
        n_layer=int(field("n_layer")),
        n_head=int(field("n_head")),
        n_embd=n_embd,
        mlp_ratio=n_inner / n_embd,
        layer_norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
        dropout=float(hf_config.get("resid_pdrop", 0.0)),
    )
    if config.n_inner != n_inner:
        raise HFFormatError(f"{source}: n_inner={n_inner} cannot be expressed as a ratio of n_embd={n_embd}")
    return config


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers ImageGPTConfig dict (config.json of `save_pretrained`) for an igpt ModelConfig."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "imagegpt",
        "vocab_size": config.vocab_size + 1,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "quick_gelu",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": "float32",
    }


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder: model.safetensors, a sharded index, or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        # older hub uploads; weights_only refuses anything but tensors, so no arbitrary code runs
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"folder: {folder} has no model.safetensors, shard index or pytorch_model.bin")


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], ModelConfig, dict[str, torch.Tensor]]:
    """(config.json as read, its ModelConfig, every tensor in igpt's layout: Conv1D matrices transposed,
    fp32, contiguous, transformers' attention-mask buffers left out) of a save_pretrained folder."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"folder: {path} has no config.json (expected a save_pretrained folder)")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config, str(config_file))
    state = {}
    for name, tensor in _read_state(path).items():
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        state[name] = (tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor).float().contiguous()
    return hf_config, config, state


def model_from_state(
    config: ModelConfig, state: dict[str, torch.Tensor], source: str | os.PathLike
) -> ImageGPT:
    """An ImageGPT holding exactly `state` (every parameter, nothing else; HFFormatError naming `source`
    otherwise), built without a random init."""
    with torch.device("meta"):  # skip random init: every tensor is replaced by an imported one
        model = ImageGPT(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise HFFormatError(
            f"{source}: weights do not match config.json: missing {missing}, unexpected {unexpected}"
        )
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:  # a tensor whose shape disagrees with config.json
        raise HFFormatError(f"{source}: weights do not match config.json: {err}") from err
    return model


def load_hf(folder: str | os.PathLike) -> ImageGPT:
    """An ImageGPT (eval mode, fp32, CPU) from a transformers ImageGPTForCausalImageModeling folder."""
    _, config, state = read_hf_folder(folder)
    return model_from_state(config, state, Path(folder)).eval()


def save_hf(model: ImageGPT, folder: str | os.PathLike) -> Path:
    """Writes `model` as a transformers folder that `ImageGPTForCausalImageModeling.from_pretrained` reads."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().cpu()
        state[name] = (tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2, sort_keys=True) + "\n")
    return path


def read_openai_centers(path: str | os.PathLike) -> np.ndarray:
    """Palette centres float32 (K, 3) in [-1, 1] from openai's `kmeans_centers.npy` (validated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    try:
        centers = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise HFFormatError(f"path: {path} is not a plain .npy array: {err}") from err
    if centers.ndim != 2 or centers.shape[1] != 3 or centers.shape[0] < 2:
        raise HFFormatError(f"path: {path} holds shape {centers.shape}, expected (K, 3) colour centres")
    if not np.issubdtype(centers.dtype, np.floating):
        raise HFFormatError(f"path: {path} holds {centers.dtype}, expected floats in [-1, 1]")
    centers = centers.astype(np.float32)
    if not np.isfinite(centers).all() or np.abs(centers).max() > 1.0 + 1e-4:
        raise HFFormatError(f"path: {path} has values outside [-1, 1]; openai centres are x / 127.5 - 1")
    return np.clip(centers, -1.0, 1.0)


def load_openai_palette(path: str | os.PathLike) -> Palette:
    """openai's `kmeans_centers.npy` (the 512-colour iGPT palette) as a Palette."""
    return Palette(centers=read_openai_centers(path))

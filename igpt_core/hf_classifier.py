"""transformers interop for the classifier: `ImageGPTForImageClassification` folders both ways.

Such a folder holds the causal model's tensors without `lm_head.weight`, plus `score.weight`
(C, n_embd), an nn.Linear (not transposed); config.json is the ImageGPTConfig with `id2label` (which
sets transformers' `num_labels`). Class names travel as id2label; transformers' placeholders
`LABEL_0 .. LABEL_{C-1}` mean "no names" both ways. transformers' classifier has no next-pixel head, so
an imported classifier gets a fresh one (seeded, so imports are reproducible) and an export leaves
ours out: the joint objective re-learns it, the class logits never read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from igpt_core.classifier import ImageGPTClassifier

# the causal model's reader and layout rules serve both heads (this module folds into hf.py later:
# ARCHITECTURE.md has hf.py hold both); export still shares the private Conv1D transpose rule
from igpt_core.hf import (
    _CONV1D_SUFFIXES,
    HFFormatError,
    config_to_hf,
    model_from_state,
    read_hf_folder,
)

ARCHITECTURE = "ImageGPTForImageClassification"
LM_HEAD_SEED = 0  # the fresh next-pixel head of an imported classifier


def _placeholder(index: int) -> str:
    return f"LABEL_{index}"  # transformers' name for a class it was given no name for


def _class_names(hf_config: dict[str, Any], n_classes: int, source: str) -> list[str] | None:
    """Names from id2label (JSON keys are strings), None for none or transformers' placeholders."""
    id2label = hf_config.get("id2label") or {}
    declared = len(id2label) if id2label else hf_config.get("num_labels")
    if declared is not None and int(declared) != n_classes:
        raise HFFormatError(f"{source}: declares {declared} labels but score.weight has {n_classes} rows")
    if not id2label:
        return None
    try:
        names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        indices = sorted(int(key) for key in id2label)
    except ValueError as err:
        raise HFFormatError(f"{source}: id2label keys must be class indices: {err}") from err
    if indices != list(range(n_classes)):
        raise HFFormatError(f"{source}: id2label must name classes 0..{n_classes - 1}, got {indices}")
    return None if names == [_placeholder(i) for i in range(n_classes)] else names


def is_classifier_folder(folder: str | os.PathLike) -> bool:
    """Whether a save_pretrained folder holds an ImageGPTForImageClassification: its config.json's
    `architectures` says so, or (without `architectures`) its model.safetensors holds `score.weight`."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"folder: {path} has no config.json (expected a save_pretrained folder)")
    architectures = json.loads(config_file.read_text()).get("architectures")
    if architectures:
        return ARCHITECTURE in architectures
    weights = path / "model.safetensors"
    if not weights.is_file():
        return False  # pytorch_model.bin cannot be listed without loading it: read as the causal model
    with safe_open(str(weights), framework="pt") as tensors:
        return "score.weight" in tensors.keys()  # noqa: SIM118 - safe_open has keys(), no __contains__


def load_hf_classifier(folder: str | os.PathLike) -> ImageGPTClassifier:
    """An ImageGPTClassifier (eval mode, fp32, CPU) from a transformers ImageGPTForImageClassification folder."""
    path = Path(folder)
    config_file = path / "config.json"
    hf_config, config, state = read_hf_folder(path)
    score = state.pop("score.weight", None)
    if score is None:
        raise HFFormatError(
            f"{path}: no score.weight, so not an {ARCHITECTURE} folder (a causal model loads with "
            "igpt_core.hf.load_hf; wrap it in ImageGPTClassifier to add a head)"
        )
    if score.dim() != 2 or score.size(1) != config.n_embd:
        raise HFFormatError(
            f"{path}: score.weight has shape {tuple(score.shape)}, expected (C, {config.n_embd})"
        )
    class_names = _class_names(hf_config, score.size(0), str(config_file))
    generator = torch.Generator().manual_seed(LM_HEAD_SEED)
    state["lm_head.weight"] = torch.empty(config.vocab_size, config.n_embd).normal_(
        0.0, 0.02, generator=generator
    )
    model = model_from_state(config, state, path)
    classifier = ImageGPTClassifier(model, score.size(0), class_names=class_names)
    with torch.no_grad():
        classifier.score.weight.copy_(score)
    return classifier.eval()


def classifier_config_to_hf(classifier: ImageGPTClassifier) -> dict[str, Any]:
    """The config.json of `save_hf_classifier`: the causal model's, with the architecture and labels."""
    names = classifier.class_names or [_placeholder(i) for i in range(classifier.n_classes)]
    return {
        **config_to_hf(classifier.model.config),
        "architectures": [ARCHITECTURE],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def save_hf_classifier(classifier: ImageGPTClassifier, folder: str | os.PathLike) -> Path:
    """Writes `classifier` as a folder that `ImageGPTForImageClassification.from_pretrained` reads.

    Only a head on the last block has a transformers equivalent; any other head_layer is refused.
    """
    if not classifier.head_is_last:
        raise HFFormatError(
            f"head_layer: {classifier.head_layer} is not the last block ({classifier.model.config.n_layer - 1}); "
            f"transformers' {ARCHITECTURE} reads only the last"
        )
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in classifier.model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().float().cpu()
        state[name] = (tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor).contiguous()
    state["score.weight"] = classifier.score.weight.detach().float().cpu().contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config_json = json.dumps(classifier_config_to_hf(classifier), indent=2, sort_keys=True) + "\n"
    (path / "config.json").write_text(config_json)
    return path

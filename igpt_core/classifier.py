"""The classifier: a transformer with a classification head, its two losses and horizontal flips on tokens.

The classifier is transformers' `ImageGPTForImageClassification` layout: the pretrained transformer,
its final layer norm's output average-pooled over positions, and a linear map `score` without bias to
C classes. Its losses are classification cross-entropy (`clf_loss`) and that plus a weighted next-pixel
cross-entropy (`joint_loss`, which the paper found better than classification alone); training it is
`igpt_core.finetune`. Shapes: B batch, T positions, C classes, K palette colours, R image side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igpt_core.config import ModelConfig
from igpt_core.model import ImageGPT, inputs_from_tokens

TokenArray = TypeVar("TokenArray", np.ndarray, torch.Tensor)


def _pooled_hidden(
    model: ImageGPT, idx: torch.Tensor, head_layer: int, run_all: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(block `head_layer`'s output through ln_f, mean-pooled (B, n_embd); ln_f's output (B, T, n_embd)
    after the last block, or None when `run_all` is false and the blocks past the head are skipped)."""
    config = model.config
    if idx.dim() != 2 or not 1 <= idx.size(1) <= config.block_size:
        raise ValueError(f"idx: expected token ids (B, T<={config.block_size}), got {tuple(idx.shape)}")
    ln_f = model.transformer.ln_f
    x = model.embed(idx)  # (B, T, n_embd)
    last = config.n_layer - 1
    pooled: torch.Tensor | None = None
    for layer, block in enumerate(model.blocks()):
        x = block(x)
        if layer == head_layer and layer != last:
            pooled = ln_f(x).mean(dim=1)
            if not run_all:
                return pooled, None
    hidden = ln_f(x)  # (B, T, n_embd)
    return (hidden.mean(dim=1) if pooled is None else pooled), hidden


class ImageGPTClassifier(nn.Module):
    """An ImageGPT with a linear head `score` (no bias) on its mean-pooled, ln_f-normalised output.

    The head reads block `head_layer`'s output (the residual stream after that block) through the final
    layer norm `ln_f`, averaged over positions. For the last block this is exactly transformers'
    `ImageGPTForImageClassification` (the mean of the last hidden state, which transformers takes after
    ln_f), so the default exports to it. For an earlier block it is the same recipe cut short: ln_f is
    the norm trained to feed a head, and the blocks past the head are skipped when no next-pixel logits
    are wanted. (The linear probe's feature, block l's ln_1 input, stays the probe's own.)
    """

    def __init__(
        self,
        model: ImageGPT,
        n_classes: int,
        head_layer: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        n_layer = model.config.n_layer
        if n_classes < 2:
            raise ValueError(f"n_classes: needs at least two classes, got {n_classes}")
        layer = n_layer - 1 if head_layer is None else head_layer
        if not 0 <= layer < n_layer:
            raise ValueError(
                f"head_layer: must be in [0, {n_layer - 1}] for a {n_layer}-layer model, got {layer}"
            )
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"class_names: {len(class_names)} names for n_classes={n_classes}")
        self.model = model
        self.head_layer = layer
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        self.score = nn.Linear(model.config.n_embd, n_classes, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)  # as the model's own linear layers

    @property
    def n_classes(self) -> int:
        return self.score.out_features

    @property
    def config(self) -> ModelConfig:
        """The transformer's config (what the training loop and the checkpoint read)."""
        return self.model.config

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """The transformer's AdamW (matrices decayed) with the head's matrix added, decayed too."""
        optimizer = self.model.configure_optimizer(weight_decay, lr, betas)
        if self.score.weight.requires_grad:
            optimizer.add_param_group({"params": [self.score.weight], "weight_decay": weight_decay})
        return optimizer

    def freeze_unread(self, need_lm: bool) -> list[str]:
        """Stops gradients to what the class logits never read when no next-pixel logits are wanted:
        `lm_head` and the blocks past the head (so DDP finds no unused parameter). Returns their names."""
        if need_lm:
            return []
        unread = [self.model.lm_head, *self.model.blocks()[self.head_layer + 1 :]]
        names = []
        for module in unread:
            for name, param in module.named_parameters():
                param.requires_grad_(False)
                names.append(name)
        return names

    @property
    def head_is_last(self) -> bool:
        """Whether the head reads the last block (the layout transformers can hold)."""
        return self.head_layer == self.model.config.n_layer - 1

    def forward(self, idx: torch.Tensor, need_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits (B, C), next-pixel logits (B, T, K) when `need_lm`, else None).

        `idx` (B, T) are model inputs that begin with the start token (`inputs_from_tokens`).
        """
        pooled, hidden = _pooled_hidden(self.model, idx, self.head_layer, run_all=need_lm)
        lm_logits = self.model.lm_head(hidden) if need_lm and hidden is not None else None
        return self.score(pooled), lm_logits


def clf_loss(
    class_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Classification cross-entropy (nats) and its term, detached: {"loss_clf"}."""
    loss = F.cross_entropy(class_logits.float(), labels)
    return loss, {"loss_clf": loss.detach()}


def joint_loss(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    lm_logits: torch.Tensor,
    targets: torch.Tensor,
    gen_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_clf + gen_weight * L_gen, and both terms detached: {"loss_clf", "loss_gen"} (nats).

    L_gen is the pretraining loss (mean next-pixel cross-entropy over all positions of lm_logits
    (B, T, K) against targets (B, T)); L_clf that of class_logits (B, C) against labels (B,). The terms
    are 0-dim tensors, so logging them costs a device sync only when the caller reads them.
    """
    loss_clf = F.cross_entropy(class_logits.float(), labels)
    loss_gen = F.cross_entropy(lm_logits.float().reshape(-1, lm_logits.size(-1)), targets.reshape(-1))
    return loss_clf + gen_weight * loss_gen, {"loss_clf": loss_clf.detach(), "loss_gen": loss_gen.detach()}


def batch_loss(
    module: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_classes: int,
    start_token: int,
    need_lm: bool,
    gen_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch through `module` (the classifier or its DDP / compiled wrapper): classification
    cross-entropy, plus `gen_weight` times next-pixel cross-entropy when `need_lm`. Tokens (B, R*R) are
    image tokens (the start token is prepended here), labels (B,) in [0, n_classes)."""

    if labels.dim() != 1 or labels.size(0) != tokens.size(0):
        raise ValueError(f"labels: expected shape ({tokens.size(0)},), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels: must be in [0, {n_classes}), got [{labels.min()}, {labels.max()}]")
    inputs, targets = inputs_from_tokens(tokens.long(), start_token)
    class_logits, lm_logits = module(inputs, need_lm=need_lm)
    if lm_logits is None:
        return clf_loss(class_logits, labels)
    return joint_loss(class_logits, labels, lm_logits, targets, gen_weight)


def evaluate_classifier(
    classifier: ImageGPTClassifier, tokens: np.ndarray, labels: np.ndarray, batch_size: int, device: Any
) -> tuple[float, float, int]:
    """(correct, summed cross-entropy in nats, count) of the classifier on tokens (N, R*R), in fp32."""
    was_training = classifier.training
    classifier.eval()
    correct, nats = 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            chunk = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
            target = torch.from_numpy(labels[start : start + batch_size]).to(device)
            inputs, _ = inputs_from_tokens(chunk, classifier.config.start_token)
            logits, _ = classifier(inputs)
            correct += float((logits.argmax(dim=1) == target).sum())
            nats += float(F.cross_entropy(logits.float(), target, reduction="sum"))
    classifier.train(was_training)
    return correct, nats, len(tokens)


def flip_permutation(resolution: int) -> np.ndarray:
    """int64 (R*R,): position i of a flipped image takes the token at position perm[i] of the original."""
    return np.arange(resolution * resolution).reshape(resolution, resolution)[:, ::-1].reshape(-1)


def flip_tokens(tokens: TokenArray, resolution: int) -> TokenArray:
    """Each image of tokens (B, R*R) in raster order mirrored left to right; same shape and dtype.

    A pixel's token depends on its colour alone, so this equals quantizing the flipped image exactly.
    Done by gathering (not torch.flip, which has no uint16 kernel), so shard tokens need no cast.
    """
    if tokens.ndim != 2 or tokens.shape[1] != resolution * resolution:
        raise ValueError(f"tokens: expected shape (B, {resolution * resolution}), got {tuple(tokens.shape)}")
    perm = flip_permutation(resolution)
    if isinstance(tokens, torch.Tensor):
        return tokens[:, torch.from_numpy(perm).to(tokens.device)]
    return tokens[:, perm]


def random_flip(
    tokens: TokenArray, resolution: int, seed: int | Sequence[int], p: float = 0.5
) -> tuple[TokenArray, np.ndarray]:
    """(tokens with each image flipped with probability p, bool (B,) mask of the flipped ones).

    The choice is a function of `seed` alone (e.g. `(config.seed, step, rank)`), so a resumed run flips
    the same images without any random state in the checkpoint.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    mask = np.asarray(np.random.default_rng(seed).random(tokens.shape[0]) < p)
    flipped = flip_tokens(tokens, resolution)
    if isinstance(tokens, torch.Tensor):
        keep = torch.from_numpy(mask).to(tokens.device)[:, None]
        return torch.where(keep, flipped, tokens), mask
    return np.where(mask[:, None], flipped, tokens), mask

"""Fine-tuning: the classification head, the joint objective and horizontal flips on tokens.

The classifier is transformers' `ImageGPTForImageClassification` layout: the pretrained transformer,
its final layer norm's output average-pooled over positions, and a linear map `score` without bias to
C classes. The objective is `joint` (classification cross-entropy plus `gen_weight` times next-pixel
cross-entropy, which the paper found better than classification alone) or `clf`. The loop that
trains it (`finetune()`) builds on igpt_core/loop.py and is not here yet.
Shapes: B batch, T positions, C classes, K palette colours, R image side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from igpt_core.config import _require
from igpt_core.model import ImageGPT, inputs_from_tokens

Objective = Literal["joint", "clf"]
TokenArray = TypeVar("TokenArray", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class FinetuneConfig:
    objective: Objective = "joint"
    """joint: classification + gen_weight * next-pixel cross-entropy; clf: classification only."""
    gen_weight: float = 1.0
    """Weight of the next-pixel term in the joint objective (the paper's L_gen + L_clf is 1)."""
    head_layer: int | None = None
    """Block whose output (through ln_f, mean-pooled) feeds the head; None is the last block."""
    flip: bool = False
    """Flip each training image horizontally with probability 1/2 (done on tokens, exactly)."""
    steps: int = 500
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 32
    """Labelled images per step across all workers."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup steps before cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only, as in pretraining)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    eval_every: int = 50
    """Measure validation accuracy every this many steps; the best one is kept."""
    val_fraction: float = 0.1
    """Share of train held out (stratified, seeded) for validation when no validation shards are given."""
    max_train: int | None = None
    """Use at most this many training images, a stratified sample (None: all)."""
    max_test: int | None = None
    """Use at most this many test images, a stratified sample (None: all)."""
    workers: int = 1
    """Ray Train workers (DDP ranks)."""
    seed: int = 0
    """Seed for the head's initialisation, the validation carve-out, data order and flips."""
    from_scratch: bool = False
    """Train the same architecture from random initialisation (the baseline pretraining must beat)."""

    def __post_init__(self) -> None:
        _require(
            self.objective in ("joint", "clf"), "objective", f"must be joint or clf, got {self.objective!r}"
        )
        _require(self.gen_weight >= 0, "gen_weight", f"must be non-negative, got {self.gen_weight}")
        if self.head_layer is not None:
            _require(self.head_layer >= 0, "head_layer", f"must be non-negative, got {self.head_layer}")
        _require(self.steps >= 1, "steps", f"must be positive, got {self.steps}")
        _require(self.workers >= 1, "workers", f"must be positive, got {self.workers}")
        _require(
            self.batch_size >= self.workers,
            "batch_size",
            f"{self.batch_size} is smaller than workers={self.workers}",
        )
        _require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be non-negative, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be non-negative, got {self.weight_decay}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be non-negative, got {self.grad_clip}")
        _require(self.eval_every >= 1, "eval_every", f"must be positive, got {self.eval_every}")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train", "max_test"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, f"must be positive or None, got {value}")

    @property
    def needs_lm_logits(self) -> bool:
        """Whether the objective reads next-pixel logits (so the forward pass runs every block)."""
        return self.objective == "joint" and self.gen_weight > 0


def _pooled_hidden(
    model: ImageGPT, idx: torch.Tensor, head_layer: int, run_all: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(block `head_layer`'s output through ln_f, mean-pooled (B, n_embd); ln_f's output (B, T, n_embd)
    after the last block, or None when `run_all` is false and the blocks past the head are skipped).

    The one place this module reaches into the model's modules (wte, wpe, drop, h, ln_f): model.py is
    being reworked, and this becomes a call to a public hidden-states method once it has one.
    """
    config = model.config
    if idx.dim() != 2 or not 1 <= idx.size(1) <= config.block_size:
        raise ValueError(f"idx: expected token ids (B, T<={config.block_size}), got {tuple(idx.shape)}")
    parts = model.transformer
    pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
    x = parts.drop(parts.wte(idx) + parts.wpe(pos))  # (B, T, n_embd)
    last = config.n_layer - 1
    pooled: torch.Tensor | None = None
    for layer, block in enumerate(parts.h):
        x = block(x)
        if layer == head_layer and layer != last:
            pooled = parts.ln_f(x).mean(dim=1)
            if not run_all:
                return pooled, None
    hidden = parts.ln_f(x)  # (B, T, n_embd)
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


def finetune_loss(
    classifier: ImageGPTClassifier, tokens: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of `config` on a batch: image tokens (B, R*R) and labels (B,) -> (loss, terms).

    Under `clf` the next-pixel head (and, for an early head, the blocks past it) get no gradient: a DDP
    wrapper then needs `find_unused_parameters=True`, or those parameters frozen.
    """
    model_config = classifier.model.config
    if labels.dim() != 1 or labels.size(0) != tokens.size(0):
        raise ValueError(f"labels: expected shape ({tokens.size(0)},), got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= classifier.n_classes):
        raise ValueError(
            f"labels: must be in [0, {classifier.n_classes}), got [{labels.min()}, {labels.max()}]"
        )
    inputs, targets = inputs_from_tokens(tokens, model_config.start_token)
    class_logits, lm_logits = classifier(inputs, need_lm=config.needs_lm_logits)
    if lm_logits is None:
        return clf_loss(class_logits, labels)
    return joint_loss(class_logits, labels, lm_logits, targets, config.gen_weight)


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

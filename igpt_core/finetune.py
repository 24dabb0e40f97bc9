"""Fine-tuning: a pretrained transformer with a classification head, trained on labelled token shards.

`finetune` (the driver) checks its inputs and runs `run_worker` on every Ray Train worker
(`igpt_core.ray_train.fit`), like pretraining: DDP over `workers` ranks, checkpoints, resume after a killed
run, Ray Train's fault tolerance. `run_worker` hands the classifier, the `Classify` objective and the rank's
stream of labelled samples to the one training loop (`igpt_core.loop.train`). The checkpoint with the best
validation accuracy is the result; test accuracy is measured once, on it, at the end.
Shapes: B batch, T positions, C classes, K palette colours, R image side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from igpt_core.config import _require

if TYPE_CHECKING:
    import torch

    from igpt_core.classifier import ImageGPTClassifier

Objective = Literal["joint", "clf"]


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


def finetune_loss(
    classifier: ImageGPTClassifier, tokens: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of `config` on a batch: image tokens (B, R*R) and labels (B,) -> (loss, terms).

    Under `clf` the next-pixel head (and, for an early head, the blocks past it) get no gradient: a DDP
    wrapper then needs `find_unused_parameters=True`, or those parameters frozen.
    """
    from igpt_core.classifier import clf_loss, joint_loss  # heavy: torch
    from igpt_core.model import inputs_from_tokens  # heavy: model imports torch

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

"""Frozen, validated configuration for every stage, and the named model presets.

Each stage takes one dataclass. Fields carry an attribute docstring (the string literal right below the
field); the command line turns those into `--help`. Validation happens in `__post_init__` and every
message names the offending field, so a bad flag is reported as the flag a user typed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_CLUSTERS = 512
DEFAULT_RESOLUTION = 32
WARMUP_MAX_SHARE = 0.1
"""The largest share of a run's steps spent warming up: a run shorter than ten times its `warmup_steps`
warms up over its first 10 % (at least one step) and still decays, instead of ending at its peak rate."""


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (for config.json, MLflow params, Ray worker configs)."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Builds `cls` from a dict, ignoring keys it does not know (configs saved by newer versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class PaletteConfig:
    clusters: int = DEFAULT_CLUSTERS
    """Number of palette colours K (the model's vocabulary, without the start token)."""
    method: Literal["histogram", "minibatch"] = "histogram"
    """histogram: exact k-means over merged colour histograms; minibatch: streamed mini-batch k-means."""
    resolution: int = DEFAULT_RESOLUTION
    """Images are resized to resolution x resolution before their pixels are counted."""
    seed: int = 0
    """Seed for k-means++ initialisation and mini-batch sampling."""
    max_iter: int = 100
    """At most this many Lloyd iterations (histogram) or mini-batch steps (minibatch)."""
    tol: float = 1e-3
    """histogram: stop when an iteration lowers the inertia by less than this fraction; minibatch: stop
    after 10 steps without that much improvement of the smoothed batch inertia (see docs/BENCHMARKS.md)."""
    batch_size: int = 65536
    """Pixels per mini-batch step (minibatch method)."""

    def __post_init__(self) -> None:
        _require(2 <= self.clusters <= 65535, "clusters", f"must be in [2, 65535], got {self.clusters}")
        _require(self.method in ("histogram", "minibatch"), "method", f"unknown method {self.method!r}")
        _require(self.resolution >= 1, "resolution", f"must be positive, got {self.resolution}")
        _require(self.max_iter >= 1, "max_iter", f"must be positive, got {self.max_iter}")
        _require(self.tol >= 0, "tol", f"must be non-negative, got {self.tol}")
        _require(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class TokenizeConfig:
    resolution: int = DEFAULT_RESOLUTION
    """Images are resized to resolution x resolution; each becomes resolution**2 tokens."""
    split: str = "train"
    """Shard name prefix: shards are written as <split>-NNNNNN.tar."""
    shard_size: int = 10_000
    """Samples per output shard at most."""

    def __post_init__(self) -> None:
        _require(self.resolution >= 1, "resolution", f"must be positive, got {self.resolution}")
        _require(
            self.split.replace("_", "").replace("-", "").isalnum(),
            "split",
            f"must be letters, digits, '-' or '_', got {self.split!r}",
        )
        _require(self.shard_size >= 1, "shard_size", f"must be positive, got {self.shard_size}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = DEFAULT_CLUSTERS
    """Palette size K; the token embedding has K + 1 rows (row K is the start token)."""
    resolution: int = DEFAULT_RESOLUTION
    """Image side R; the context is R*R positions (start token + the first R*R - 1 pixels)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream."""
    mlp_ratio: float = 4.0
    """MLP inner size as a multiple of n_embd."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the mean-free, bias-free layer norm."""
    dropout: float = 0.0
    """Dropout on attention, MLP and embeddings during training."""

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 2, "vocab_size", f"must be at least 2, got {self.vocab_size}")
        _require(self.resolution >= 2, "resolution", f"must be at least 2, got {self.resolution}")
        _require(self.n_layer >= 1, "n_layer", f"must be positive, got {self.n_layer}")
        _require(self.n_head >= 1, "n_head", f"must be positive, got {self.n_head}")
        _require(
            self.n_embd % self.n_head == 0,
            "n_embd",
            f"{self.n_embd} is not divisible by n_head={self.n_head}",
        )
        _require(self.mlp_ratio > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")

    @property
    def block_size(self) -> int:
        """Positions the model attends over: R*R (the last pixel is predicted, never fed)."""
        return self.resolution * self.resolution

    @property
    def start_token(self) -> int:
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_inner(self) -> int:
        return int(round(self.mlp_ratio * self.n_embd))

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, inner = self.n_embd, self.n_inner
        per_block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        return (
            (self.vocab_size + 1) * d
            + self.block_size * d
            + self.n_layer * per_block
            + d
            + d * self.vocab_size
        )

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N + 6 L T d for attention (PaLM appendix B)."""
        non_embedding = self.num_params() - (self.vocab_size + 1 + self.block_size) * self.n_embd
        return 6.0 * non_embedding + 6.0 * self.n_layer * self.block_size * self.n_embd

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)


PresetName = Literal["tiny", "s", "m", "l", "xl"]
DEFAULT_PRESET: PresetName = "tiny"

# Released iGPT sizes (as published in transformers' ImageGPT checkpoints); `tiny`, for CPUs, is
# ModelConfig's defaults.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "s": dict(n_layer=24, n_head=8, n_embd=512),
    "m": dict(n_layer=36, n_head=8, n_embd=1024),
    "l": dict(n_layer=48, n_head=16, n_embd=1536),
    "xl": dict(n_layer=60, n_head=16, n_embd=3072),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The model config of a named preset (tiny, s, m, l, xl), with any field overridden."""
    if name not in _PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def preset_names() -> list[str]:
    return list(_PRESETS)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 32
    """Sequences per step across all workers (each worker takes batch_size // workers)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup steps before cosine decay, capped at 10% of --steps (at least 1) so a short run
    still decays."""
    weight_decay: float = 0.01
    """AdamW weight decay (applied to matrices, not to norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW decay rate of the gradient's running mean."""
    beta2: float = 0.95
    """AdamW decay rate of the squared gradient's running mean."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    log_every: int = 10
    """Report train loss, tokens/s and learning rate every this many steps."""
    eval_every: int = 100
    """Evaluate held-out loss (nats and bits per token) every this many steps."""
    eval_batches: int = 4
    """Held-out batches per evaluation."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """How many of the latest checkpoints to keep."""
    workers: int = 1
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool | None = None
    """One GPU per worker; None uses GPUs when the cluster has them."""
    seed: int = 0
    """Seed for initialisation and data order."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may make after a worker dies."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Autocast dtype: auto uses bf16 on GPUs that support it and on CPUs with native bf16
    (AVX512-BF16 or AMX, where it measured ~1.6x fp32's step with the same loss curve), fp32
    elsewhere. Held-out loss is evaluated in fp32 whatever this is."""
    compile: bool = False
    """Run the training step's forward and backward through torch.compile (inductor). Measured 3-7%
    faster per step on a 2-core CPU (4 layers, d=256, R=32, bf16; 7-12% in fp32) after a one-off
    compilation of ~15 s, so it pays off on long runs; CPU workers need a C++ compiler. Held-out
    evaluation stays eager."""
    train_split: str = "train"
    """Split of the shard folder to train on."""
    eval_split: str | None = None
    """Held-out split; None takes 'val', else 'test', else holds out the first train samples."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK fills a node first (fast intra-node allreduce), SPREAD puts
    them on different nodes (one rank per node)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", f"must be positive, got {self.steps}")
        _require(
            self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            "placement_strategy",
            f"must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}",
        )
        _require(
            self.precision in ("auto", "bf16", "fp32"),
            "precision",
            f"must be auto, bf16 or fp32, got {self.precision!r}",
        )
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
        _require(0.0 <= self.beta1 < 1.0, "beta1", f"must be in [0, 1), got {self.beta1}")
        _require(0.0 <= self.beta2 < 1.0, "beta2", f"must be in [0, 1), got {self.beta2}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be non-negative, got {self.grad_clip}")
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            _require(value >= 1, name, f"must be positive, got {value}")
        _require(self.max_failures >= 0, "max_failures", f"must be non-negative, got {self.max_failures}")

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.workers

    @property
    def schedule_warmup_steps(self) -> int:
        """The warmup the schedule uses: `warmup_steps`, capped at WARMUP_MAX_SHARE of `steps`."""
        if self.warmup_steps == 0:
            return 0
        return min(self.warmup_steps, max(1, int(self.steps * WARMUP_MAX_SHARE)))


@dataclass(frozen=True)
class ProbeConfig:
    layer: int | Literal["all"] | None = None
    """Block whose attention input is the feature; None means n_layer // 2; 'all' sweeps every layer."""
    batch_size: int = 16
    """Images per feature-extraction batch. 16 was the fastest compiled (332 images/s against 307 at 32
    and 285 at 64; tiny preset, bf16, 2 cores, bench/bench_features.py), which is what a large probe runs."""
    val_fraction: float = 0.1
    """Share of the training split held out to choose the regularisation strength."""
    c_grid: tuple[float, ...] = field(default=(0.01, 0.1, 1.0, 10.0))
    """Inverse regularisation strengths tried for logistic regression."""
    max_iter: int = 100
    """L-BFGS iterations at most per logistic-regression fit (scikit-learn's default). Each C starts from the
    previous C's solution and the refit from the chosen one's; on 100,000 raw-pixel rows an iteration
    costs ~0.4 s, and 100 against 1,000 moved validation accuracy by under 0.01 (docs/BENCHMARKS.md)."""
    max_train: int | None = None
    """At most this many training images, a seeded sample stratified by class over the whole split
    (None: all)."""
    max_test: int | None = None
    """At most this many test images, a seeded sample stratified by class over the whole split (None: all)."""
    seed: int = 0
    """Seed for the train and test samples, the validation split (stratified by class) and the classifiers;
    also of the random-init baseline when the checkpoint records no training seed."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Feature extraction's autocast: auto uses bf16 where the hardware does it natively (as pretraining),
    else fp32; fp32 gives the features of a plain forward pass."""

    def __post_init__(self) -> None:
        _require(
            self.precision in ("auto", "bf16", "fp32"),
            "precision",
            f"must be auto, bf16 or fp32, got {self.precision!r}",
        )
        if isinstance(self.layer, int):
            _require(self.layer >= 0, "layer", f"must be non-negative, got {self.layer}")
        else:
            _require(self.layer in (None, "all"), "layer", f"must be an integer or 'all', got {self.layer!r}")
        _require(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(len(self.c_grid) >= 1, "c_grid", "needs at least one value")
        _require(self.max_iter >= 1, "max_iter", f"must be positive, got {self.max_iter}")


@dataclass(frozen=True)
class FinetuneConfig:
    objective: Literal["joint", "clf"] = "joint"
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
    warmup_steps: int = 100
    """Linear warmup steps before cosine decay, capped at 10% of --steps (at least 1) so a short run
    still decays."""
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
    log_every: int = 10
    """Report the training loss (each term) every this many steps."""
    keep_checkpoints: int = 2
    """Checkpoints Ray Train keeps: the best by validation accuracy, and always the latest."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the run fails."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast where the hardware does it natively, else fp32 (as pretraining)."""

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

    def train_config(self) -> TrainConfig:
        """The loop's settings: evaluation and checkpoints on the same steps, so each checkpoint has a
        validation accuracy for Ray Train to keep the best by."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr_ratio=self.min_lr_ratio,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            log_every=self.log_every,
            eval_every=self.eval_every,
            checkpoint_every=self.eval_every,
            keep_checkpoints=self.keep_checkpoints,
            workers=self.workers,
            seed=self.seed,
            max_failures=self.max_failures,
            precision=self.precision,
        )

    @property
    def needs_lm_logits(self) -> bool:
        """Whether the objective reads next-pixel logits (so the forward pass runs every block)."""
        return self.objective == "joint" and self.gen_weight > 0


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string right below each field), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# ---------------------------------------------------------------------------------- pipeline presets
# The stage configs of a whole pipeline run, named; flows.pipeline.PipelineParams takes its defaults from
# the `demo` one, so the demo's small sizes are written here only.


@dataclass(frozen=True)
class PipelinePreset:
    """One pipeline run's stage configs: palette, tokenize, model (and the preset it came from), train,
    probe, fine-tuning. Resolution and palette size agree across them."""

    model_preset: str
    """The named model size `model` was made from (tiny, s, m, l, xl)."""
    palette: PaletteConfig
    tokenize: TokenizeConfig
    model: ModelConfig
    train: TrainConfig
    probe: ProbeConfig
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The fine-tuning stage's budget and recipe."""


def _demo_preset() -> PipelinePreset:
    # Grey 8x8 digits upscaled to 16x16 need few colours; 200 steps of 16 images take a minute on a CPU.
    clusters, resolution, model_preset = 16, 16, "tiny"
    return PipelinePreset(
        model_preset=model_preset,
        palette=PaletteConfig(clusters=clusters, resolution=resolution),
        tokenize=TokenizeConfig(resolution=resolution),
        model=preset(model_preset, vocab_size=clusters, resolution=resolution),
        train=TrainConfig(steps=200, batch_size=16),
        probe=ProbeConfig(max_train=1000, max_test=1000),
        # 60 steps of 16 images on at most 500 labelled images, three evaluations to choose the kept
        # checkpoint from: 118 s with Ray Train's start on the busy 2-core build machine (2026-12).
        finetune=FinetuneConfig(
            steps=60, batch_size=16, lr=5e-4, warmup_steps=6, eval_every=20, max_train=500, max_test=500
        ),
    )


_PIPELINE_PRESETS = {"demo": _demo_preset}


def pipeline_preset(name: str = "demo") -> PipelinePreset:
    """The stage configs of a named pipeline preset (`demo`: the `igpt run` defaults)."""
    if name not in _PIPELINE_PRESETS:
        raise ConfigError(
            f"pipeline preset: unknown preset {name!r}; choose one of {', '.join(_PIPELINE_PRESETS)}"
        )
    return _PIPELINE_PRESETS[name]()


DEMO = pipeline_preset("demo")
"""The demo pipeline: builtin digits at 16x16, 16 colours, the tiny model, 200 steps of 16 images, then
60 fine-tuning steps."""

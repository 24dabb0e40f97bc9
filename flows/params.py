"""The flow's parameters (`PipelineParams`) and its result (`PipelineSummary`).

PipelineParams' defaults are the `demo` pipeline preset of igpt_core.config (its stage configs), and the
fields that are a stage config's field take that field's description; only what no stage config has
(held-out split, samples, workspace, retraining) is written here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from igpt_core import tracking
from igpt_core.config import (
    DEMO,
    ModelConfig,
    PaletteConfig,
    TokenizeConfig,
    TrainConfig,
    field_docs,
    preset,
    preset_names,
)
from igpt_core.finetune import FinetuneConfig
from igpt_core.retrain import DEFAULT_REPLAY_SHARE, DEFAULT_TOLERANCE_ACCURACY, DEFAULT_TOLERANCE_BITS

_PALETTE = field_docs(PaletteConfig)
_TOKENIZE = field_docs(TokenizeConfig)
_TRAIN = field_docs(TrainConfig)
_FINETUNE = field_docs(FinetuneConfig)
_FT = DEMO.finetune


class PipelineParams(BaseModel):
    """Parameters of one pipeline run (the flow's only parameter; deployments pass it as `params`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = "builtin:digits"
    """Training images: any spec `igpt_core.sources.open_source` reads."""
    heldout: str | None = None
    """Held-out images; None splits `source` deterministically (by key) into train and held-out."""
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of `source` held out when `heldout` is None."""
    clusters: int = Field(DEMO.palette.clusters, ge=2, le=65535, description=_PALETTE["clusters"])
    resolution: int = Field(DEMO.tokenize.resolution, ge=2, description=_TOKENIZE["resolution"])
    preset: str = DEMO.model_preset
    """Model size: tiny, s, m, l, xl."""
    steps: int = Field(DEMO.train.steps, ge=1, description=_TRAIN["steps"])
    batch_size: int = Field(DEMO.train.batch_size, ge=1, description=_TRAIN["batch_size"])
    lr: float = Field(DEMO.train.lr, gt=0.0, description=_TRAIN["lr"])
    workers: int = Field(DEMO.train.workers, ge=1, description=_TRAIN["workers"])
    compile: bool = Field(DEMO.train.compile, description=_TRAIN["compile"])
    precision: Literal["auto", "bf16", "fp32"] = Field(DEMO.train.precision, description=_TRAIN["precision"])
    probe: bool = True
    """Run the linear probe (needs labelled data)."""
    probe_limit: int | None = Field(DEMO.probe.max_train, ge=10)
    """At most this many train and held-out images in the probe, each a seeded sample stratified by class
    (None: all); it bounds the demo's time."""
    samples: int = Field(16, ge=0)
    """Unconditional samples (and up to 8 completions) drawn for the sample grids; 0 skips the stage."""
    seed: int = DEMO.train.seed
    """Seed of the palette fit, training and sampling."""
    finetune: bool | None = None
    """Fine-tune a classifier from the checkpoint (stage `finetune`, registered as `classifier_name`);
    None: when the train and held-out data are labelled."""
    finetune_steps: int = Field(_FT.steps, ge=1, description=_FINETUNE["steps"])
    finetune_batch_size: int = Field(_FT.batch_size, ge=1, description=_FINETUNE["batch_size"])
    finetune_lr: float = Field(_FT.lr, gt=0.0, description=_FINETUNE["lr"])
    finetune_objective: Literal["joint", "clf"] = Field(_FT.objective, description=_FINETUNE["objective"])
    finetune_limit: int | None = Field(_FT.max_train, ge=10)
    """At most this many train and held-out images in fine-tuning, a stratified sample of each (None:
    all); it bounds the demo's time."""
    finetune_from_scratch: bool = Field(_FT.from_scratch, description=_FINETUNE["from_scratch"])
    workspace: str | None = None
    """Workspace folder; None: IGPT_HOME, else ./igpt-home."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: MLFLOW_TRACKING_URI, else SQLite mlflow.db in the workspace."""
    ray_address: str | None = None
    """An existing Ray cluster; None: RAY_ADDRESS, else a local Ray."""
    experiment: str = tracking.EXPERIMENT
    """MLflow experiment of the runs."""
    model_name: str = tracking.MODEL_NAME
    """Registered model name; None of the stages registers when empty."""
    classifier_name: str = tracking.CLASSIFIER_NAME
    """Registered model name of the fine-tuned classifier; not registered when empty."""
    mode: Literal["full", "retrain"] = "full"
    """full: the whole pipeline; retrain: continue the `champion` model version on new data."""
    watch: str | None = None
    """Retraining: the watched folder of new data batches; None: <workspace>/incoming."""
    retrain_steps: int = Field(100, ge=1)
    """Retraining: optimizer steps added to the registered model's."""
    refit: bool = False
    """Retraining: refit the palette on the new data even without drift."""
    drift_threshold: float = Field(1.5, gt=0.0)
    """Retraining: refit when new data's quantization MSE exceeds this multiple of the palette's own."""
    replay_share: float = Field(DEFAULT_REPLAY_SHARE, ge=0.0, le=100.0)
    """Retraining: images replayed from the champion's training data, as a share of the new training
    images (seeded, uniform), mixed in so the model keeps what it knew; 0 trains on the new data alone."""
    retry_rejected: bool = False
    """Retraining: also take batches that only challengers kept out of `champion` were trained on (to
    retry them, e.g. with replay); otherwise a batch is new until any version was trained on it."""
    promote_tolerance: float = Field(DEFAULT_TOLERANCE_BITS, ge=0.0)
    """Champion: a new igpt version takes the alias `champion` when its held-out bits/token on the
    champion's fixed held-out shards is at most the champion's plus this."""
    promote_accuracy_tolerance: float = Field(DEFAULT_TOLERANCE_ACCURACY, ge=0.0, le=1.0)
    """Champion: a new classifier takes `champion` when its accuracy on the champion classifier's test
    shards is at least the champion's minus this."""
    compare_limit: int | None = Field(2000, ge=1)
    """Champion: challenger and champion are scored on the first this many samples of the fixed
    held-out (or test) shards (None: all)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in preset_names():
            raise ValueError(f"preset: unknown preset {value!r}; choose one of {', '.join(preset_names())}")
        return value

    def build_train_config(self, steps: int | None = None) -> TrainConfig:
        """The TrainConfig of this run (`steps` overrides, for retraining); warmup, evaluation and
        checkpoint intervals scale with the step count so short runs still evaluate and checkpoint."""
        total = steps or self.steps
        return dataclasses.replace(
            DEMO.train,
            steps=total,
            batch_size=self.batch_size,
            lr=self.lr,
            workers=self.workers,
            seed=self.seed,
            compile=self.compile,
            precision=self.precision,
            warmup_steps=min(100, max(1, total // 10)),
            eval_every=max(1, min(100, total // 3)),
            checkpoint_every=max(1, min(100, total // 2)),
        )

    def build_finetune_config(self) -> FinetuneConfig:
        """The FinetuneConfig of this run: the demo preset's with this run's budget, workers and seed;
        warmup and evaluation intervals scale with the step count so short runs still evaluate."""
        total = self.finetune_steps
        return dataclasses.replace(
            _FT,
            steps=total,
            batch_size=self.finetune_batch_size,
            lr=self.finetune_lr,
            objective=self.finetune_objective,
            from_scratch=self.finetune_from_scratch,
            max_train=self.finetune_limit,
            max_test=self.finetune_limit,
            workers=self.workers,
            seed=self.seed,
            warmup_steps=min(_FT.warmup_steps, max(1, total // 10)),
            eval_every=max(1, min(_FT.eval_every, total // 3)),
        )

    def build_model_config(self, clusters: int) -> ModelConfig:
        """The preset's ModelConfig for a palette of `clusters` colours at this resolution."""
        return preset(self.preset, vocab_size=clusters, resolution=self.resolution)


@dataclass
class PipelineSummary:
    """What a pipeline run produced; `str()` is the short report `igpt run` prints. `stages` maps each
    stage that ran or was reused to its reference as a dict (flows/refs.py, with `reused`)."""

    flow_run_id: str | None
    parent_run_id: str
    tracking_uri: str
    workspace: str
    mode: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_version: str | None = None
    model_name: str | None = None
    probe: dict[str, float] | None = None
    finetune: dict[str, Any] | None = None
    classifier_name: str | None = None
    classifier_version: str | None = None
    sample_grid: str | None = None
    completion_grid: str | None = None
    note: str | None = None
    champion: dict[str, Any] | None = None
    """The champion decision for the igpt version: decision, reason, metric, both figures, versions."""
    classifier_champion: dict[str, Any] | None = None
    """The same for the classifier version."""

    def reused(self) -> list[str]:
        return [name for name, ref in self.stages.items() if ref.get("reused")]

    def __str__(self) -> str:
        lines = [f"igpt {self.mode} run finished (MLflow parent run {self.parent_run_id})"]
        if self.note:
            lines.append(f"  {self.note}")
        for name, ref in self.stages.items():
            state = "reused" if ref.get("reused") else "ran"
            lines.append(f"  {name:<17} {state:<6} {ref.get('dir', '')}")
        lines.append(f"  MLflow store:   {self.tracking_uri}")
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"  MLflow UI:      mlflow ui --backend-store-uri {self.tracking_uri}")
        if self.model_version:
            lines.append(
                f"  model:          {self.model_name} version {self.model_version} (models:/{self.model_name}/{self.model_version})"
            )
        if self.probe:
            p = self.probe
            lines.append(
                f"  probe accuracy: {p['accuracy']:.3f} (random-init {p['random_init']:.3f}, raw pixels {p['raw_pixels']:.3f})"
            )
        if self.finetune:
            f = self.finetune
            lines.append(
                f"  fine-tuned:     test accuracy {f['test_accuracy']:.3f} (validation {f['val_accuracy']:.3f} "
                f"at step {f['best_step']} of {f['steps']}, {f['objective']})"
            )
        if self.champion:
            lines.append(f"  champion:       {_decision_line(self.champion)}")
        if self.classifier_version:
            clf, version = self.classifier_name, self.classifier_version
            lines.append(f"  classifier:     {clf} version {version} (models:/{clf}/{version})")
        if self.classifier_champion:
            lines.append(f"  classifier champion: {_decision_line(self.classifier_champion)}")
        if self.sample_grid:
            lines.append(f"  samples:        {self.sample_grid}")
        if self.completion_grid:
            lines.append(f"  completions:    {self.completion_grid}")
        return "\n".join(lines)


def _decision_line(decision: dict[str, Any]) -> str:
    """`<name>@champion is v<N>` and the decision on this run's version, with its reason."""
    head = f"{decision['name']}@champion is v{decision['champion']}"
    if decision.get("decision") == "unchanged":
        return f"{head} (v{decision['version']} was registered before)"
    return f"{head}; v{decision['version']} {decision['decision']}: {decision['reason']}"

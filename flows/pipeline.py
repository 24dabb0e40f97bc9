"""The Prefect flow `igpt`: palette -> tokenize (train, held-out) -> pretrain -> probe -> samples.

Each stage is a task that calls one igpt_core function, writes into a content-addressed workspace folder
(see flows/workspace.py), records a nested MLflow run, and returns a small reference (folder, digest,
MLflow run id, a few numbers). The same flow does retraining (`mode="retrain"`, see flows/retrain.py).
Deployments read `igpt/<name>` (prefect.yaml); `run_pipeline` is the plain function `igpt run` calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows import workspace as ws
from flows.stages import (
    RunContext,
    call_stage,
    palette_stage,
    pretrain_stage,
    probe_stage,
    register_stage,
    samples_stage,
    source_digest,
    split_stage,
    tokenize_stage,
)
from igpt_core import tracking

STAGES = ("split", "palette", "tokenize-train", "tokenize-heldout", "pretrain", "probe", "samples")


class PipelineParams(BaseModel):
    """Parameters of one pipeline run (the flow's only parameter; deployments pass it as `params`)."""

    model_config = ConfigDict(extra="forbid")

    source: str = "builtin:digits"
    """Training images: any spec `igpt_core.sources.open_source` reads."""
    heldout: str | None = None
    """Held-out images; None splits `source` deterministically (by key) into train and held-out."""
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of `source` held out when `heldout` is None."""
    clusters: int = Field(16, ge=2, le=65535)
    """Palette size K (the demo data, grey digits, needs few colours; 512 for colour photos)."""
    resolution: int = Field(16, ge=2)
    """Images are resized to resolution x resolution."""
    preset: str = "tiny"
    """Model size: tiny, s, m, l, xl."""
    steps: int = Field(200, ge=1)
    """Optimizer steps of pretraining."""
    batch_size: int = Field(16, ge=1)
    """Sequences per step across all workers."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate."""
    workers: int = Field(1, ge=1)
    """Ray Train workers."""
    compile: bool = False
    """Pretrain through torch.compile: a few percent faster per step after a one-off compilation."""
    probe: bool = True
    """Run the linear probe (needs labelled data)."""
    probe_limit: int | None = Field(1000, ge=10)
    """At most this many train and held-out images in the probe (None: all); it bounds the demo's time."""
    samples: int = Field(16, ge=0)
    """Unconditional samples (and up to 8 completions) drawn for the sample grids; 0 skips the stage."""
    seed: int = 0
    workspace: str | None = None
    """Workspace folder; None: IGPT_HOME, else ./igpt-home."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: MLFLOW_TRACKING_URI, else SQLite mlflow.db in the workspace."""
    ray_address: str | None = None
    """An existing Ray cluster; None: RAY_ADDRESS, else a local Ray."""
    experiment: str = tracking.EXPERIMENT
    model_name: str = tracking.MODEL_NAME
    """Registered model name; None of the stages registers when empty."""
    mode: Literal["full", "retrain"] = "full"
    """full: the whole pipeline; retrain: continue the latest registered model on new data only."""
    watch: str | None = None
    """Retraining: the watched folder of new data batches; None: <workspace>/incoming."""
    retrain_steps: int = Field(100, ge=1)
    """Retraining: optimizer steps added to the registered model's."""
    refit: bool = False
    """Retraining: refit the palette on the new data even without drift."""
    drift_threshold: float = Field(1.5, gt=0.0)
    """Retraining: refit when new data's quantization MSE exceeds this multiple of the palette's own."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from igpt_core.config import preset_names

        if value not in preset_names():
            raise ValueError(f"preset: unknown preset {value!r}; choose one of {', '.join(preset_names())}")
        return value

    def build_train_config(self, steps: int | None = None) -> Any:
        """The TrainConfig of this run (`steps` overrides, for retraining); warmup, evaluation and
        checkpoint intervals scale with the step count so short runs still evaluate and checkpoint."""
        from igpt_core.config import TrainConfig

        return TrainConfig(
            steps=steps or self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            workers=self.workers,
            seed=self.seed,
            compile=self.compile,
            warmup_steps=min(100, max(1, (steps or self.steps) // 10)),
            eval_every=max(1, min(100, (steps or self.steps) // 3)),
            checkpoint_every=max(1, min(100, (steps or self.steps) // 2)),
        )

    def build_model_config(self, clusters: int) -> Any:
        """The preset's ModelConfig for a palette of `clusters` colours at this resolution."""
        from igpt_core.config import preset

        return preset(self.preset, vocab_size=clusters, resolution=self.resolution)


@dataclass
class PipelineSummary:
    """What a pipeline run produced; `str()` is the short report `igpt run` prints."""

    flow_run_id: str | None
    parent_run_id: str
    tracking_uri: str
    workspace: str
    mode: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_version: str | None = None
    model_name: str | None = None
    probe: dict[str, float] | None = None
    sample_grid: str | None = None
    completion_grid: str | None = None
    note: str | None = None

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
        if self.sample_grid:
            lines.append(f"  samples:        {self.sample_grid}")
        if self.completion_grid:
            lines.append(f"  completions:    {self.completion_grid}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- flow


def open_context(params: PipelineParams, flow_run_id: str | None) -> RunContext:
    """Resolves the workspace and MLflow store and opens the parent run tagged with the flow run id."""
    root = ws.home(params.workspace)
    uri = params.tracking_uri or tracking.default_tracking_uri(root)
    mlflow = tracking.client(uri)
    local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    experiment_id = tracking.ensure_experiment(
        mlflow, params.experiment, root / "mlartifacts" if local_store else None
    )
    parent = tracking.start_run(
        mlflow,
        experiment_id,
        "pipeline" if params.mode == "full" else "retrain",
        tags={
            "prefect.flow_run_id": flow_run_id or "",
            "igpt.mode": params.mode,
            "igpt.workspace": str(root),
        },
        params=params.model_dump(),
    )
    return RunContext(
        str(root), uri, experiment_id, parent, params.ray_address or os.environ.get("RAY_ADDRESS")
    )


def full_pipeline(ctx: RunContext, params: PipelineParams) -> PipelineSummary:
    """palette -> tokenize (train, held-out) -> pretrain -> register -> probe -> samples."""
    summary = PipelineSummary(None, ctx.parent_run_id, ctx.tracking_uri, ctx.root, "full")
    stages = summary.stages
    train_spec, held_spec = params.source, params.heldout
    train_digest = source_digest(train_spec)
    origin: dict[str, str] = {}
    if held_spec is None:
        key = ws.digest_of("split", train_digest, params.heldout_fraction, params.resolution)
        stages["split"] = call_stage(
            split_stage,
            ctx,
            "splits",
            key,
            {train_spec: train_digest},
            params.heldout_fraction,
            params.resolution,
        )
        train_spec, train_digest = stages["split"]["train"], stages["split"]["train_digest"]
        held_spec, held_digest = stages["split"]["heldout"], stages["split"]["heldout_digest"]
        origin = {"split": stages["split"]["run_id"]}
    else:
        held_digest = source_digest(held_spec)

    key = ws.digest_of("palette", train_digest, params.clusters, params.resolution, params.seed)
    palette = stages["palette"] = call_stage(
        palette_stage,
        ctx,
        "palettes",
        key,
        train_spec,
        train_digest,
        params.clusters,
        params.resolution,
        params.seed,
        held_spec,
        origin,
    )
    up = {**origin, "palette": palette["run_id"]}
    key = ws.digest_of("shards", train_digest, palette["palette_digest"], params.resolution, "train")
    shards = stages["tokenize-train"] = call_stage(
        tokenize_stage, ctx, "shards", key, train_spec, train_digest, "train", palette, params.resolution, up
    )
    key = ws.digest_of("shards", held_digest, palette["palette_digest"], params.resolution, "test")
    held = stages["tokenize-heldout"] = call_stage(
        tokenize_stage, ctx, "shards", key, held_spec, held_digest, "test", palette, params.resolution, up
    )

    model = _config_dict(params.build_model_config(palette["clusters"]))
    train = _config_dict(params.build_train_config())
    # Training evaluates on samples it holds out of the train shards, so the held-out set is not one of
    # its inputs: new held-out data reruns probe and samples, never training.
    key = ws.digest_of("checkpoint", shards["manifest_digest"], model, train)
    up = {"palette": palette["run_id"], "tokenize-train": shards["run_id"]}
    checkpoint = stages["pretrain"] = call_stage(
        pretrain_stage, ctx, "checkpoints", key, shards, palette, model, train, up
    )
    mse = palette.get("metrics", {}).get("heldout_quant_mse")
    finish(
        ctx, params, summary, checkpoint, shards, held, extra_tags={"igpt.palette_mse": mse} if mse else None
    )
    return summary


def finish(
    ctx: RunContext,
    params: PipelineParams,
    summary: PipelineSummary,
    checkpoint: dict[str, Any],
    shards: dict[str, Any],
    held: dict[str, Any] | None,
    extra_tags: dict[str, Any] | None = None,
) -> None:
    """register -> probe -> samples, shared by the full pipeline and retraining."""
    stages = summary.stages
    if params.model_name:
        tags = {
            "igpt.palette_digest": checkpoint["palette_digest"],
            "igpt.shards_digest": checkpoint["shards_digest"],
            "igpt.code_version": tracking.code_version(),
            "igpt.parent_run": ctx.parent_run_id,
            "igpt.checkpoint_digest": checkpoint["digest"],
            "igpt.step": checkpoint["step"],
            **(extra_tags or {}),
        }
        summary.model_name = params.model_name
        summary.model_version = register_stage(ctx, params.model_name, checkpoint, tags)
    up = {"pretrain": checkpoint["run_id"]}
    if params.probe and held is not None:
        limit = params.probe_limit
        key = ws.digest_of(
            "probe", checkpoint["digest"], shards["manifest_digest"], held["manifest_digest"], limit
        )
        stages["probe"] = call_stage(
            probe_stage,
            ctx,
            "probes",
            key,
            checkpoint,
            shards,
            held,
            {**up, "tokenize-heldout": held["run_id"]},
            limit,
        )
        summary.probe = stages["probe"]["probe"]
    if params.samples > 0:
        key = ws.digest_of(
            "samples",
            checkpoint["digest"],
            held["manifest_digest"] if held else None,
            params.samples,
            params.seed,
        )
        stages["samples"] = call_stage(
            samples_stage, ctx, "samples", key, checkpoint, held, params.samples, params.seed, up
        )
        summary.sample_grid = stages["samples"]["sample_grid"]
        summary.completion_grid = stages["samples"].get("completion_grid")
    mlflow = tracking.client(ctx.tracking_uri)
    tracking.set_tags(
        mlflow,
        ctx.parent_run_id,
        {f"igpt.stage.{name}": ref["run_id"] for name, ref in stages.items() if ref.get("run_id")},
    )
    if summary.model_version:
        tracking.set_tags(
            mlflow, ctx.parent_run_id, {"igpt.model_version": f"{params.model_name}/{summary.model_version}"}
        )
    if summary.probe:
        tracking.log_metrics(mlflow, ctx.parent_run_id, {f"probe_{k}": v for k, v in summary.probe.items()})


def _config_dict(config: Any) -> dict[str, Any]:
    from igpt_core.config import to_dict

    return to_dict(config)


@flow(name="igpt", log_prints=True)
def igpt(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # noqa: B008 (a pydantic default)
    """The igpt pipeline. Parameters: one `PipelineParams` (deployments set it as `params`)."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    ctx = open_context(params, flow_run_id)
    mlflow = tracking.client(ctx.tracking_uri)
    try:
        if params.mode == "retrain":
            from flows.retrain import retrain

            summary = retrain(ctx, params)
        else:
            summary = full_pipeline(ctx, params)
    except BaseException as error:
        tracking.end_run(mlflow, ctx.parent_run_id, failed=True, error=f"{type(error).__name__}: {error}")
        raise
    tracking.end_run(mlflow, ctx.parent_run_id)
    summary.flow_run_id = flow_run_id
    get_run_logger().info("%s", summary)
    return summary.__dict__


def run_pipeline(params: PipelineParams | None = None) -> PipelineSummary:
    """Runs the flow in this process (what `igpt run` calls). Without PREFECT_API_URL Prefect starts its
    temporary local server for the run; Ray starts locally unless RAY_ADDRESS is set; MLflow writes to
    SQLite in the workspace unless MLFLOW_TRACKING_URI is set."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    # The temporary server migrates a fresh database on first use; on a busy small machine that takes
    # longer than Prefect's default 20 s wait. An explicit setting in the environment still wins.
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
        result = igpt(params or PipelineParams())
    return PipelineSummary(**result)

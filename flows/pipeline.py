"""The Prefect flow `igpt`: palette -> tokenize (train, held-out) -> pretrain -> probe -> samples -> finetune.

Each stage is a task (flows/stages.py) that calls one igpt_core function, writes into a content-addressed
workspace folder (flows/workspace.py), records a nested MLflow run, and returns a typed reference
(flows/refs.py). The same flow does retraining (`mode="retrain"`, flows/retrain.py). Deployments read
`igpt/<name>` (prefect.yaml); `run_pipeline` is the plain function `igpt run` calls.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows import workspace as ws
from flows.finish import finish
from flows.params import PipelineParams, PipelineSummary
from flows.retrain import retrain
from flows.runner import RunContext
from flows.stages import (
    palette_stage,
    pretrain_stage,
    source_digest,
    split_stage,
    tokenize_stage,
)
from igpt_core import tracking
from igpt_core.config import to_dict

__all__ = ["STAGES", "PipelineParams", "PipelineSummary", "igpt", "run_pipeline"]

STAGES = (
    "split",
    "palette",
    "tokenize-train",
    "tokenize-heldout",
    "pretrain",
    "probe",
    "samples",
    "finetune",
)


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
    """split (without a held-out source) -> palette -> tokenize (train, held-out) -> pretrain -> finish."""
    summary = PipelineSummary(None, ctx.parent_run_id, ctx.tracking_uri, ctx.root, "full")
    stages = summary.stages
    train_spec, held_spec = params.source, params.heldout
    train_digest = source_digest(train_spec)
    origin: dict[str, str] = {}
    if held_spec is None:
        split = split_stage(
            ctx=ctx,
            key=ws.digest_of("split", train_digest, params.heldout_fraction, params.resolution),
            sources={train_spec: train_digest},
            fraction=params.heldout_fraction,
            resolution=params.resolution,
        )
        stages["split"] = split.model_dump()
        train_spec, train_digest = split.train, split.train_digest
        held_spec, held_digest = split.heldout, split.heldout_digest
        origin = {"split": split.run_id}
    else:
        held_digest = source_digest(held_spec)

    palette = palette_stage(
        ctx=ctx,
        key=ws.digest_of("palette", train_digest, params.clusters, params.resolution, params.seed),
        source=train_spec,
        digest=train_digest,
        clusters=params.clusters,
        resolution=params.resolution,
        seed=params.seed,
        heldout=held_spec,
        upstream=origin,
    )
    stages["palette"] = palette.model_dump()
    up = {**origin, "palette": palette.run_id}
    shards = tokenize_stage(
        ctx=ctx,
        key=ws.digest_of("shards", train_digest, palette.palette_digest, params.resolution, "train"),
        source=train_spec,
        digest=train_digest,
        split="train",
        palette=palette,
        resolution=params.resolution,
        upstream=up,
    )
    stages["tokenize-train"] = shards.model_dump()
    held = tokenize_stage(
        ctx=ctx,
        key=ws.digest_of("shards", held_digest, palette.palette_digest, params.resolution, "test"),
        source=held_spec,
        digest=held_digest,
        split="test",
        palette=palette,
        resolution=params.resolution,
        upstream=up,
    )
    stages["tokenize-heldout"] = held.model_dump()

    model = params.build_model_config(palette.clusters)
    train = params.build_train_config()
    # Training evaluates on samples it holds out of the train shards, so the held-out set is not one of
    # its inputs: new held-out data reruns probe and samples, never training.
    checkpoint = pretrain_stage(
        ctx=ctx,
        key=ws.digest_of("checkpoint", shards.manifest_digest, to_dict(model), to_dict(train)),
        shards=shards,
        palette=palette,
        model=model,
        train=train,
        upstream={"palette": palette.run_id, "tokenize-train": shards.run_id},
    )
    stages["pretrain"] = checkpoint.model_dump()
    mse = palette.metrics.get("heldout_quant_mse")
    # the images training saw, which a later retrain replays a share of
    tags: dict[str, Any] = {
        tracking.TRAIN_SOURCE_TAG: train_spec,
        tracking.TRAIN_SOURCE_DIGEST_TAG: train_digest,
    }
    if mse:
        tags["igpt.palette_mse"] = mse
    finish(ctx, params, summary, checkpoint, shards, held, extra_tags=tags)
    return summary


@flow(name="igpt", log_prints=True)
def igpt(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # noqa: B008 (a pydantic default)
    """The igpt pipeline. Parameters: one `PipelineParams` (deployments set it as `params`)."""
    flow_run_id = flow_run.get_id()
    ctx = open_context(params, flow_run_id)
    mlflow = tracking.client(ctx.tracking_uri)
    try:
        summary = retrain(ctx, params) if params.mode == "retrain" else full_pipeline(ctx, params)
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
    # The temporary server migrates a fresh database on first use; on a busy small machine that takes
    # longer than Prefect's default 20 s wait. An explicit setting in the environment still wins.
    timeout = int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
        result = igpt(params or PipelineParams())
    return PipelineSummary(**result)

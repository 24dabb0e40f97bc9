"""register -> probe -> samples -> finetune (and its registration): the end of a pipeline run, shared by
the full pipeline and retraining, and the parent MLflow run's summary tags."""

from __future__ import annotations

from typing import Any

from flows import workspace as ws
from flows.classifier import run_finetune
from flows.params import PipelineParams, PipelineSummary
from flows.refs import CheckpointRef, ShardsRef
from flows.runner import RunContext
from flows.stages import probe_stage, register_stage, samples_stage
from igpt_core import tracking


def finish(
    ctx: RunContext,
    params: PipelineParams,
    summary: PipelineSummary,
    checkpoint: CheckpointRef,
    shards: ShardsRef,
    held: ShardsRef | None,
    extra_tags: dict[str, Any] | None = None,
) -> None:
    """Registers the checkpoint (tags: digests, code version, parent run, `extra_tags`), probes it, draws
    samples, fine-tunes a classifier from it (flows/classifier.py), and tags the parent run with every
    stage's run id and the model versions."""
    stages = summary.stages
    if params.model_name:
        tags = {
            "igpt.palette_digest": checkpoint.palette_digest,
            "igpt.shards_digest": checkpoint.shards_digest,
            "igpt.code_version": tracking.code_version(),
            "igpt.parent_run": ctx.parent_run_id,
            "igpt.checkpoint_digest": checkpoint.digest,
            "igpt.step": checkpoint.step,
            **(extra_tags or {}),
        }
        summary.model_name = params.model_name
        summary.model_version = register_stage(
            ctx=ctx, name=params.model_name, checkpoint=checkpoint, tags=tags
        )
    up = {"pretrain": checkpoint.run_id}
    if params.probe and held is not None:
        limit = params.probe_limit
        # "stratified": probes cached when the limit took a prefix are not this probe
        key = ws.digest_of(
            "probe", checkpoint.digest, shards.manifest_digest, held.manifest_digest, limit, "stratified"
        )
        probe = probe_stage(
            ctx=ctx,
            key=key,
            checkpoint=checkpoint,
            train=shards,
            heldout=held,
            upstream={**up, "tokenize-heldout": held.run_id},
            limit=limit,
        )
        stages["probe"] = probe.model_dump()
        summary.probe = probe.probe.model_dump()
    if params.samples > 0:
        key = ws.digest_of(
            "samples",
            checkpoint.digest,
            held.manifest_digest if held else None,
            params.samples,
            params.seed,
        )
        samples = samples_stage(
            ctx=ctx,
            key=key,
            checkpoint=checkpoint,
            heldout=held,
            n=params.samples,
            seed=params.seed,
            upstream=up,
        )
        stages["samples"] = samples.model_dump()
        summary.sample_grid = samples.sample_grid
        summary.completion_grid = samples.completion_grid
    run_finetune(ctx, params, summary, checkpoint, shards, held)
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
    if summary.classifier_version:
        tracking.set_tags(
            mlflow,
            ctx.parent_run_id,
            {"igpt.classifier_version": f"{summary.classifier_name}/{summary.classifier_version}"},
        )
    if summary.finetune:
        scores = {k: summary.finetune[k] for k in ("test_accuracy", "val_accuracy")}
        tracking.log_metrics(mlflow, ctx.parent_run_id, {f"finetune_{k}": v for k, v in scores.items()})

"""register -> probe -> samples -> finetune (and its registration): the end of a pipeline run, shared by
the full pipeline and retraining, and the parent MLflow run's summary tags.

Registration is judged (flows/classifier.py `register_judged`): the first igpt version becomes
`igpt@champion`; every later one is a challenger, scored beside the champion on the champion's fixed
held-out shards by held-out bits/token (igpt_core.retrain.heldout_bits) and given the alias only when not
worse by more than `promote_tolerance`; the decision is tagged on the version and on the parent run.
"""

from __future__ import annotations

from typing import Any

from flows import workspace as ws
from flows.classifier import register_judged, run_finetune
from flows.params import PipelineParams, PipelineSummary
from flows.refs import CheckpointRef, ShardsRef
from flows.runner import RunContext
from flows.stages import probe_stage, samples_stage
from igpt_core import tracking
from igpt_core.retrain import heldout_bits


def finish(
    ctx: RunContext,
    params: PipelineParams,
    summary: PipelineSummary,
    checkpoint: CheckpointRef,
    shards: ShardsRef,
    held: ShardsRef | None,
    extra_tags: dict[str, Any] | None = None,
) -> None:
    """Registers the checkpoint judged against the champion (tags: digests, code version, parent run,
    `extra_tags`, the decision), probes it, draws samples, fine-tunes a classifier from it
    (flows/classifier.py), and tags the parent run with every stage's run id, the model versions and
    the champion decisions."""
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
        limit = params.compare_limit

        def bits(folder: str, shards_dir: str, split: str) -> float:
            return float(heldout_bits(folder, shards_dir, split=split, limit=limit)["bits_per_token"])

        summary.model_name = params.model_name
        summary.model_version, summary.champion = register_judged(
            ctx,
            params.model_name,
            checkpoint,
            tags,
            checkpoint_dir=checkpoint.checkpoint,
            palette_digest=checkpoint.palette_digest,
            own_eval=None
            if held is None
            else tracking.EvalShards(held.dir, held.manifest_digest, held.split),
            score=bits,
            metric="heldout_bits_per_token",
            tolerance=params.promote_tolerance,
            higher_is_better=False,
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
    for prefix, decision in (
        ("champion", summary.champion),
        ("classifier_champion", summary.classifier_champion),
    ):
        if decision:
            record_decision(mlflow, ctx.parent_run_id, prefix, decision)


def record_decision(mlflow: Any, run_id: str, prefix: str, decision: dict[str, Any]) -> None:
    """Tags the parent run with a champion decision (`igpt.<prefix>.decision`, `.reason`, `.version`,
    `.champion`) and logs both figures as metrics (`<prefix>_challenger_score`, `_champion_score`)."""
    tags = {
        f"igpt.{prefix}.{key}": decision[key]
        for key in ("decision", "reason", "metric", "version", "champion", "against")
        if decision.get(key) is not None
    }
    tracking.set_tags(mlflow, run_id, {**tags, f"igpt.{prefix}.model": decision["name"]})
    figures = {
        f"{prefix}_{key}": decision[key]
        for key in ("challenger_score", "champion_score")
        if decision.get(key) is not None
    }
    tracking.log_metrics(mlflow, run_id, figures)

"""The `finetune` stage: a classifier fine-tuned from the pretrain stage's checkpoint on the labelled train
shards, tested on the held-out shards, and registered as its own model (`igpt-classifier`).

It runs after pretrain and registration (so its MLflow run can name the pretrained model version it
started from, the link the lineage walk follows back to the data), when the training data is labelled
(`PipelineParams.finetune`). The work is `igpt_core.finetune.finetune`'s.

`register_judged` is how both models are registered: a new version is judged against its model's
`champion` first (igpt_core.tracking.judge; a classifier on accuracy on the champion classifier's test
shards), registered with the decision in its tags, and given the alias when it is not worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows import workspace as ws
from flows.params import PipelineParams, PipelineSummary
from flows.refs import CheckpointRef, FinetuneRef, ShardsRef, StageRef
from flows.runner import (
    RunContext,
    checkpoint_input,
    run_stage,
    shards_input,
    stage_task,
)
from flows.stages import register_stage
from igpt_core import tracking
from igpt_core.checkpoint import CHECKPOINT_FILES
from igpt_core.config import to_dict
from igpt_core.data import load_tokens
from igpt_core.finetune import FinetuneConfig, finetune, format_finetune_table
from igpt_core.retrain import classifier_accuracy

__all__ = [
    "classifier_tags",
    "finetune_key",
    "finetune_scores",
    "finetune_stage",
    "register_judged",
    "run_finetune",
    "shards_labelled",
]


@stage_task("finetune")
def finetune_stage(
    *,
    ctx: RunContext,
    key: str,
    checkpoint: CheckpointRef,
    train: ShardsRef,
    test: ShardsRef,
    config: FinetuneConfig,
    upstream: dict[str, str],
) -> FinetuneRef:
    """Fine-tunes the pretrained checkpoint with a classification head on the labelled `train` shards
    (validation carved from them) and tests the kept checkpoint on `test`; logs the curves, the accuracy
    table, finetune.json and the classifier checkpoint. `upstream` may hold `model` (`<name>/<version>`
    of the registered pretrained model), which the lineage walk follows."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        result = finetune(
            checkpoint.checkpoint,
            train.dir,
            test.dir,
            folder,
            config=config,
            ray_address=ctx.ray_address,
            run_name=f"finetune-{key[:12]}",
        )
        report = result.report
        scores = finetune_scores(report)
        tracking.log_history(mlflow, run_id, result.history)
        tracking.log_metrics(
            mlflow,
            run_id,
            {
                "test_accuracy": scores["test_accuracy"],
                "best_val_accuracy": scores["val_accuracy"],
                "best_step": scores["best_step"],
                "absent_test_classes": len(report.get("absent_test_classes") or []),
            },
            step=scores["steps"],
        )
        table = folder / "finetune.md"
        table.write_text(format_finetune_table(report) + "\n")
        curve = tracking.save_curve_png(result.history, folder / "loss.png")
        for item in (folder / "finetune.json", table, curve):
            if item is not None and item.is_file():
                tracking.log_artifact(mlflow, run_id, item)
        # The classifier checkpoint (weights with the head, config, palette, trainer state), not Ray's
        # run storage beside it.
        for item in sorted(Path(result.checkpoint_dir).iterdir()):
            if item.is_file() and item.name in CHECKPOINT_FILES:
                tracking.log_artifact(mlflow, run_id, item, tracking.CHECKPOINT_ARTIFACT)
        return {
            "checkpoint": str(result.checkpoint_dir),
            "finetune": scores,
            "pretrain_digest": checkpoint.digest,
            "palette_digest": checkpoint.palette_digest,
            "shards_digest": train.manifest_digest,
            "test_shards_digest": test.manifest_digest,
        }

    return run_stage(
        ctx,
        FinetuneRef,
        "finetune",
        "classifiers",
        key,
        build,
        inputs=[checkpoint_input(checkpoint), shards_input(train, "train"), shards_input(test, "test")],
        upstream=upstream,
        params={f"finetune.{k}": v for k, v in to_dict(config).items()},
        keep_partial=True,  # a killed fine-tuning run resumes from its own checkpoints there
    )


def finetune_key(checkpoint: CheckpointRef, train: ShardsRef, test: ShardsRef, config: FinetuneConfig) -> str:
    """The workspace digest of a finetune stage: the pretrained checkpoint's, both shard manifests', the
    config's. The registered model version is not in it: the same weights give the same classifier."""
    return ws.digest_of(
        "classifier", checkpoint.digest, train.manifest_digest, test.manifest_digest, to_dict(config)
    )


def finetune_scores(report: dict[str, Any]) -> dict[str, Any]:
    """The FinetuneScores fields of a finetune.json report."""
    return {
        "test_accuracy": float(report["test_accuracy"]),
        "val_accuracy": float(report["val_accuracy"]),
        "best_step": int(report["best_step"]),
        "steps": int(report["steps"]),
        "n_classes": int(report["n_classes"]),
        "objective": str(report["objective"]),
        "from_scratch": bool(report["from_scratch"]),
    }


def shards_labelled(ref: ShardsRef) -> bool:
    """Whether the shards carry labels, judged by their first sample (fine-tuning itself refuses a folder
    that is only partly labelled, naming it)."""
    return load_tokens(ref.dir, split=ref.split, limit=1)[1] is not None


def classifier_tags(
    ctx: RunContext, ref: FinetuneRef, checkpoint: CheckpointRef, pretrained: str | None
) -> dict[str, Any]:
    """The tags of a classifier version: what it was fine-tuned from (the registered pretrained version
    and its pretrain run, the checkpoint digest), the digests of its data, its scores and the code."""
    scores = ref.finetune
    tags: dict[str, Any] = {
        "igpt.pretrain_run": checkpoint.run_id,
        "igpt.pretrained_checkpoint_digest": checkpoint.digest,
        "igpt.checkpoint_digest": ref.digest,
        "igpt.palette_digest": ref.palette_digest,
        "igpt.shards_digest": ref.shards_digest,
        "igpt.test_shards_digest": ref.test_shards_digest,
        "igpt.code_version": tracking.code_version(),
        "igpt.parent_run": ctx.parent_run_id,
        "igpt.objective": scores.objective,
        "igpt.from_scratch": scores.from_scratch,
        "igpt.n_classes": scores.n_classes,
        "igpt.step": scores.best_step,
        "igpt.val_accuracy": scores.val_accuracy,
        "igpt.test_accuracy": scores.test_accuracy,
    }
    if pretrained:
        tags["igpt.pretrained_model"] = pretrained
    return tags


def run_finetune(
    ctx: RunContext,
    params: PipelineParams,
    summary: PipelineSummary,
    checkpoint: CheckpointRef,
    train: ShardsRef,
    test: ShardsRef | None,
) -> None:
    """Runs the finetune stage when `params.finetune` and the data call for it, registers its classifier
    as `params.classifier_name` (unless empty) and records both in `summary`."""
    if test is None or params.finetune is False:
        return
    # None: on when the data is labelled. True runs it regardless, and unlabelled shards then fail the
    # stage with finetune's error naming them.
    if params.finetune is None and not (shards_labelled(train) and shards_labelled(test)):
        return
    pretrained = f"{summary.model_name}/{summary.model_version}" if summary.model_version else None
    upstream = {
        "pretrain": checkpoint.run_id,
        "tokenize-train": train.run_id,
        "tokenize-heldout": test.run_id,
    }
    if pretrained:
        upstream["model"] = pretrained
    config = params.build_finetune_config()
    ref = finetune_stage(
        ctx=ctx,
        key=finetune_key(checkpoint, train, test, config),
        checkpoint=checkpoint,
        train=train,
        test=test,
        config=config,
        upstream=upstream,
    )
    summary.stages["finetune"] = ref.model_dump()
    summary.finetune = ref.finetune.model_dump()
    if params.classifier_name:
        limit = params.compare_limit

        def accuracy(folder: str, shards: str, split: str) -> float:
            return float(classifier_accuracy(folder, shards, split=split, limit=limit)["accuracy"])

        summary.classifier_name = params.classifier_name
        summary.classifier_version, summary.classifier_champion = register_judged(
            ctx,
            params.classifier_name,
            ref,
            classifier_tags(ctx, ref, checkpoint, pretrained),
            checkpoint_dir=ref.checkpoint,
            palette_digest=ref.palette_digest,
            own_eval=tracking.EvalShards(test.dir, test.manifest_digest, test.split),
            score=accuracy,
            metric="test_accuracy",
            tolerance=params.promote_accuracy_tolerance,
            higher_is_better=True,
        )


def register_judged(
    ctx: RunContext,
    name: str,
    ref: StageRef,
    tags: dict[str, Any],
    *,
    checkpoint_dir: str,
    palette_digest: str,
    own_eval: tracking.EvalShards | None,
    score: Callable[[str, str, str], float],
    metric: str,
    tolerance: float,
    higher_is_better: bool,
) -> tuple[str, dict[str, Any]]:
    """Registers the checkpoint of stage `ref` as a version of `name` judged against `name@champion`;
    returns (version, the decision as a dict for PipelineSummary).

    A version already registered from that run (a rerun that reused the stage) is not judged again: its
    decision was tagged when it was made, and the summary says `unchanged`.
    """
    mlflow = tracking.client(ctx.tracking_uri)
    if tracking.version_for_run(mlflow, name, ref.run_id) is not None:
        version = register_stage(ctx=ctx, name=name, checkpoint=ref, tags=tags)
        return version, _decision(mlflow, name, version, None)
    judgement = tracking.judge(
        mlflow,
        name,
        checkpoint_dir,
        palette_digest=palette_digest,
        own_eval=own_eval,
        score=score,
        metric=metric,
        tolerance=tolerance,
        higher_is_better=higher_is_better,
        download_to=Path(ctx.root) / "registry",
    )
    version = register_stage(ctx=ctx, name=name, checkpoint=ref, tags={**tags, **judgement.tags})
    if judgement.promotion.promote:
        tracking.set_champion(mlflow, name, version)
    return version, _decision(mlflow, name, version, judgement)


def _decision(mlflow: Any, name: str, version: str, judgement: tracking.Judgement | None) -> dict[str, Any]:
    champion = tracking.champion_version(mlflow, name)
    out: dict[str, Any] = {
        "name": name,
        "version": version,
        "champion": None if champion is None else str(champion.version),
    }
    if judgement is None:
        return {**out, "decision": "unchanged"}
    promotion = judgement.promotion
    return {
        **out,
        "decision": promotion.decision,
        "reason": promotion.reason,
        "metric": promotion.metric,
        "challenger_score": _finite(promotion.challenger),
        "champion_score": _finite(promotion.champion),
        "tolerance": promotion.tolerance,
        "against": judgement.against,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

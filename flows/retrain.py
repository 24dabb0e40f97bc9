"""Retraining on new data: the `igpt.data.added` event, and the retrain branch of the flow.

What is in the watched folder, which batches are new, whether the palette drifted, the step training
continues from and the replay share are igpt_core.retrain's decisions; this module runs the stages they
call for. The registry says what has been learned: a batch is new until a registered version lists its
digest in `igpt.new_data`, so the same check works from any machine that reaches the tracking server.

A retrain continues `igpt@champion` (not the newest version) on the new batches mixed with a replayed
share of the champion's training images (stage `replay`), and registers a challenger that takes the
alias only when it is not worse on the champion's fixed held-out shards (flows/finish.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL

from flows import workspace as ws
from flows.finish import finish
from flows.params import PipelineParams, PipelineSummary
from flows.refs import PaletteRef, SplitRef, WarmStart
from flows.runner import RunContext, StageFailed, dataset, run_stage, stage_task
from flows.stages import (
    palette_stage,
    pretrain_stage,
    source_digest,
    split_stage,
    tokenize_stage,
)
from igpt_core import tracking
from igpt_core.checkpoint import read_config
from igpt_core.config import ModelConfig, from_dict, to_dict
from igpt_core.palette import Palette
from igpt_core.retrain import (
    NEW_DATA_TAG,
    base_step,
    consumed_digests,
    list_batches,
    new_batches,
    publish_batches,
    quantization_mse,
    refit_decision,
    replay_count,
    watched_folder,
    write_replay_mix,
)

__all__ = [
    "EVENT",
    "NEW_DATA_TAG",
    "add_data",
    "base_version",
    "emit_data_added",
    "list_batches",
    "replay_stage",
    "retrain",
]

EVENT = "igpt.data.added"
"""The Prefect event `add_data` emits; the `retrain-on-new-data` deployment is triggered by it."""


def add_data(paths: Iterable[str | Path], to: str | Path, *, emit: bool = True) -> dict[str, Any]:
    """Copies `paths` into the watched folder `to` as new batches (igpt_core.retrain.publish_batches) and
    emits `igpt.data.added` with the folder and the batch names. Without a reachable Prefect API the
    event is not sent (`event_id` None) and the scheduled retraining picks the batches up.
    Returns {"watch", "batches", "event_id"}."""
    watch, batches = publish_batches(paths, to)
    event_id = emit_data_added(watch, batches) if emit else None
    return {"watch": str(watch), "batches": batches, "event_id": event_id}


def emit_data_added(watch: str | Path, batches: list[str]) -> str | None:
    """Emits the `igpt.data.added` Prefect event for `watch`; returns its id, or None when no Prefect API
    is configured (events then have nowhere to go)."""
    if not PREFECT_API_URL.value():
        # Prefect would start a temporary server just to receive it, and nothing listens there.
        return None
    event = emit_event(
        event=EVENT,
        resource={
            "prefect.resource.id": f"igpt.source.{Path(watch).resolve()}",
            "prefect.resource.name": Path(watch).name,
        },
        payload={"watch": str(watch), "batches": batches},
    )
    return str(event.id) if event is not None else None


def base_version(mlflow: Any, name: str) -> Any | None:
    """The version a retrain continues: `name@champion`; a registry from before the alias existed has
    its newest version made champion (tagged so), so every retrain starts from the alias."""
    champion = tracking.champion_version(mlflow, name)
    if champion is not None:
        return champion
    latest = tracking.latest_version(mlflow, name)
    if latest is None:
        return None
    tracking.set_champion(mlflow, name, latest.version)
    tracking.set_version_tags(
        mlflow,
        name,
        latest.version,
        {
            tracking.DECISION_TAG: "first",
            "igpt.champion.reason": "adopted: the newest version when no alias existed",
        },
    )
    return tracking.champion_version(mlflow, name)


@stage_task("replay")
def replay_stage(
    *,
    ctx: RunContext,
    key: str,
    split: SplitRef,
    source: tuple[str, str],
    share: float,
    seed: int,
    resolution: int,
    upstream: dict[str, str],
) -> SplitRef:
    """The retrain's training images: the new batches' train split followed by `share` times as many
    images drawn (seeded) from `source` (spec, digest), the images the champion was trained on
    (igpt_core.retrain.write_replay_mix); the held-out split stays the new data's."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        mix = folder / "train.npz"
        counts = write_replay_mix(split.train, source[0], mix, share=share, seed=seed, resolution=resolution)
        tracking.log_metrics(mlflow, run_id, counts)
        return {
            "train": str(mix),
            "heldout": split.heldout,
            "train_digest": source_digest.fn(str(mix)),
            "heldout_digest": split.heldout_digest,
            "counts": {
                **counts,
                "train": counts["new"] + counts["replay"],
                "heldout": split.counts["heldout"],
            },
        }

    return run_stage(
        ctx,
        SplitRef,
        "replay",
        "replays",
        key,
        build,
        inputs=[
            dataset(split.train, split.train_digest, "train", "source", split.train),
            dataset(source[0], source[1], "replay", "source", source[0]),
        ],
        upstream=upstream,
        params={"replay_share": share, "seed": seed, "resolution": resolution, "replay_source": source[0]},
    )


def retrain(ctx: RunContext, params: PipelineParams) -> PipelineSummary:
    """Continues `igpt@champion` on the batches no version has seen yet.

    New batches are split (train/held-out) deterministically; the train split is mixed with a replayed
    share (`replay_share`) of the champion's training images; both are tokenized with the current palette
    (refit when asked or on drift; the decision is recorded), training continues from the champion's
    checkpoint for `retrain_steps` more steps, and the result is registered as a challenger with lineage
    to the champion and the new data, judged against the champion (flows/finish.py). With no new data
    the run records that and stops.
    """
    summary = PipelineSummary(None, ctx.parent_run_id, ctx.tracking_uri, ctx.root, "retrain")
    mlflow = tracking.client(ctx.tracking_uri)
    name = params.model_name or tracking.MODEL_NAME
    watch = watched_folder(params.watch, ctx.root)
    base = base_version(mlflow, name)
    if base is None:
        raise StageFailed(
            f"stage retrain failed: model {name!r} has no registered version to continue; run full-pipeline first"
        )

    versions = tracking.all_versions(mlflow, name)
    if params.retry_rejected:  # batches only rejected challengers saw count as new again
        versions = [v for v in versions if v.tags.get(tracking.DECISION_TAG) != "kept"]
    consumed = consumed_digests(version.tags for version in versions)
    found = {str(path): source_digest(str(path)) for path in list_batches(watch)}
    new = new_batches(found, consumed)
    tracking.set_tags(
        mlflow,
        ctx.parent_run_id,
        {
            "igpt.watch": str(watch),
            "igpt.base_model": f"{name}/{base.version}",
            "igpt.base_model_alias": f"{name}@{tracking.CHAMPION}",
        },
    )
    tracking.log_metrics(mlflow, ctx.parent_run_id, {"batches_seen": len(found), "batches_new": len(new)})
    if not new:
        summary.note = f"no new data in {watch} (batches seen: {len(found)}); nothing to do"
        tracking.set_tags(mlflow, ctx.parent_run_id, {"igpt.retrain": "no new data"})
        return summary

    stages = summary.stages
    checkpoint_dir = tracking.load_registered(
        name,
        base.version,
        dst=Path(ctx.root) / "registry" / f"{name}-v{base.version}",
        tracking_uri=ctx.tracking_uri,
    )
    current = Palette.load(checkpoint_dir)
    base_run = mlflow.get_run(base.run_id)
    # The registered checkpoint's palette stands in for a palette stage's output; its digest is the
    # centres' (no workspace folder holds it).
    palette = PaletteRef(
        stage="palette",
        dir=str(checkpoint_dir),
        digest=current.digest(),
        run_id=base_run.data.tags.get("igpt.upstream.palette", base.run_id),
        palette_digest=current.digest(),
        clusters=current.clusters,
    )
    saved = read_config(checkpoint_dir)
    model = from_dict(ModelConfig, saved)
    resolution = model.resolution

    split = split_stage(
        ctx=ctx,
        key=ws.digest_of("split", ws.digest_of(sorted(new.values())), params.heldout_fraction, resolution),
        sources=new,
        fraction=params.heldout_fraction,
        resolution=resolution,
    )
    stages["split"] = split.model_dump()

    decision = refit_decision(
        quantization_mse(current, split.heldout, resolution),
        float(base.tags.get("igpt.palette_mse", "nan")),
        refit=params.refit,
        threshold=params.drift_threshold,
    )
    tracking.log_metrics(
        mlflow,
        ctx.parent_run_id,
        {
            "new_quant_mse": decision.new_mse,
            "base_quant_mse": decision.base_mse,
            "quant_mse_ratio": decision.ratio,
        },
    )
    tracking.set_tags(mlflow, ctx.parent_run_id, {"igpt.palette_refit": decision.reason})
    up = {"split": split.run_id}
    train_images = split
    replayed = 0
    if params.replay_share > 0 and replay_count(split.counts["train"], params.replay_share) > 0:
        source = tracking.training_source(mlflow, base)
        if source is None:
            raise StageFailed(
                f"stage replay failed: champion {name}/{base.version} records no training images "
                f"({tracking.TRAIN_SOURCE_TAG}); retrain with replay_share=0"
            )
        now = source_digest(source[0])
        if source[1] and now != source[1]:
            raise StageFailed(
                f"stage replay failed: the champion's training images {source[0]} changed since it was "
                f"trained (digest {now[:12]}, recorded {source[1][:12]}); retrain with replay_share=0"
            )
        train_images = replay_stage(
            ctx=ctx,
            key=ws.digest_of("replay", split.train_digest, now, params.replay_share, params.seed, resolution),
            split=split,
            source=(source[0], now),
            share=params.replay_share,
            seed=params.seed,
            resolution=resolution,
            upstream={"split": split.run_id},
        )
        stages["replay"] = train_images.model_dump()
        up["replay"] = train_images.run_id
        replayed = train_images.counts["replay"]
    tracking.log_metrics(
        mlflow,
        ctx.parent_run_id,
        {"train_new_samples": split.counts["train"], "train_replay_samples": replayed},
    )
    if decision.refit:
        palette = palette_stage(
            ctx=ctx,
            key=ws.digest_of("palette", train_images.train_digest, current.clusters, resolution, params.seed),
            source=train_images.train,
            digest=train_images.train_digest,
            clusters=current.clusters,
            resolution=resolution,
            seed=params.seed,
            heldout=split.heldout,
            upstream=up,
        )
        stages["palette"] = palette.model_dump()
    up = {**up, "palette": palette.run_id}
    shards = tokenize_stage(
        ctx=ctx,
        key=ws.digest_of("shards", train_images.train_digest, palette.palette_digest, resolution, "train"),
        source=train_images.train,
        digest=train_images.train_digest,
        split="train",
        palette=palette,
        resolution=resolution,
        upstream=up,
    )
    stages["tokenize-train"] = shards.model_dump()
    held = tokenize_stage(
        ctx=ctx,
        key=ws.digest_of("shards", split.heldout_digest, palette.palette_digest, resolution, "test"),
        source=split.heldout,
        digest=split.heldout_digest,
        split="test",
        palette=palette,
        resolution=resolution,
        upstream=up,
    )
    stages["tokenize-heldout"] = held.model_dump()

    train = params.build_train_config(base_step(saved, base.tags) + params.retrain_steps)
    warm = WarmStart(
        checkpoint=str(checkpoint_dir),
        model=f"{name}/{base.version}",
        checkpoint_digest=base.tags.get("igpt.checkpoint_digest"),
    )
    checkpoint = pretrain_stage(
        ctx=ctx,
        key=ws.digest_of(
            "checkpoint", shards.manifest_digest, to_dict(model), to_dict(train), warm.checkpoint_digest
        ),
        shards=shards,
        palette=palette,
        model=model,
        train=train,
        upstream={"palette": palette.run_id, "tokenize-train": shards.run_id, "split": split.run_id},
        warm_start=warm,
    )
    stages["pretrain"] = checkpoint.model_dump()
    finish(
        ctx,
        params,
        summary,
        checkpoint,
        shards,
        held,
        extra_tags={
            NEW_DATA_TAG: json.dumps(sorted(new.values())),
            "igpt.parent_model": f"{name}/{base.version}",
            tracking.TRAIN_SOURCE_TAG: train_images.train,
            tracking.TRAIN_SOURCE_DIGEST_TAG: train_images.train_digest,
            "igpt.replay_share": params.replay_share,
            "igpt.replay_samples": replayed,
            "igpt.palette_refit": decision.reason,
            "igpt.palette_mse": decision.new_mse if decision.refit else decision.base_mse,
        },
    )
    summary.note = (
        f"retrained {name} v{base.version} (champion) on {len(new)} new batch(es) in {watch} and "
        f"{replayed} replayed image(s) (replay_share {params.replay_share:g}); palette refit: {decision.reason}"
    )
    return summary

"""Retraining on new data: the watched folder, the `igpt.data.added` event, and the retrain branch of the flow.

The watched folder (default `<IGPT_HOME>/incoming`) holds batches: each entry (a folder of images, a tar,
an .npz, a parquet file) is one source, added whole by `add_data`. A batch is new until a registered
model version lists its digest in the tag `igpt.new_data`; so the registry, not a local file, says what
has been learned, and the same check works from any machine that reaches the tracking server.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flows import workspace as ws
from flows.pipeline import PipelineParams, PipelineSummary, finish
from flows.stages import (
    RunContext,
    StageFailed,
    call_stage,
    palette_stage,
    pretrain_stage,
    source_digest,
    split_stage,
    tokenize_stage,
)
from igpt_core import tracking

EVENT = "igpt.data.added"
"""The Prefect event `add_data` emits; the `retrain-on-new-data` deployment is triggered by it."""
NEW_DATA_TAG = "igpt.new_data"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def watched_folder(params: PipelineParams, root: str | Path) -> Path:
    return Path(params.watch).expanduser().resolve() if params.watch else Path(root) / "incoming"


def list_batches(watch: Path) -> list[Path]:
    """The batches in the watched folder, by name; hidden entries (batches being copied in) are skipped."""
    if not watch.is_dir():
        return []
    return sorted(p for p in watch.iterdir() if not p.name.startswith("."))


def add_data(paths: Iterable[str | Path], to: str | Path, *, emit: bool = True) -> dict[str, Any]:
    """Copies `paths` into the watched folder `to` as one new batch and emits `igpt.data.added`.

    Folders, tars, .npz and parquet files become a batch each (sources keep their own layout); loose image
    files are gathered into one folder batch. Each batch is copied under a hidden name and renamed when
    complete, so a retraining run never reads half a batch. The event carries the folder and the batch
    names; without a reachable Prefect API it is not sent (`event_id` None) and the scheduled retraining
    picks the batch up. Returns {"watch", "batches", "event_id"}.
    """
    watch = Path(to).expanduser().resolve()
    watch.mkdir(parents=True, exist_ok=True)
    sources = [Path(p).expanduser() for p in paths]
    if not sources:
        raise ValueError("paths: give at least one image file, folder or tar to add")
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise FileNotFoundError(f"paths: no such file or folder: {', '.join(missing)}")
    loose = [p for p in sources if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    batches: list[str] = []
    for src in (p for p in sources if p not in loose):
        digest = ws.tree_digest(src)[:10]
        name = f"{src.name.split('.')[0]}-{digest}{''.join(src.suffixes) if src.is_file() else ''}"
        batches.append(_publish(watch, name, lambda tmp, src=src: _copy(src, tmp)))
    if loose:
        digest = ws.digest_of(sorted(ws.file_digest(p) for p in loose))[:10]

        def copy_loose(tmp: Path) -> None:
            tmp.mkdir()
            for path in loose:
                shutil.copy2(path, tmp / path.name)

        batches.append(_publish(watch, f"images-{digest}", copy_loose))
    event_id = emit_data_added(watch, batches) if emit else None
    return {"watch": str(watch), "batches": batches, "event_id": event_id}


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _publish(watch: Path, name: str, write: Any) -> str:
    final = watch / name
    if final.exists():
        return name  # the same content was added before: its name is its digest
    tmp = watch / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        write(tmp)
        tmp.rename(final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return name


def emit_data_added(watch: str | Path, batches: list[str]) -> str | None:
    """Emits the `igpt.data.added` Prefect event for `watch`; returns its id, or None when no Prefect API
    is configured (events then have nowhere to go)."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

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


def consumed_digests(mlflow: Any, name: str) -> set[str]:
    """Digests of the data batches that registered versions of `name` were trained on."""
    seen: set[str] = set()
    for version in tracking.all_versions(mlflow, name):
        seen.update(json.loads(version.tags.get(NEW_DATA_TAG, "[]")))
    return seen


def retrain(ctx: RunContext, params: PipelineParams) -> PipelineSummary:
    """Continues the latest registered model on the batches no version has seen yet.

    New batches are gathered and split (train/held-out) deterministically, tokenized with the current
    palette (refit when asked or when their quantization MSE drifts past `drift_threshold` times the
    palette's own; the decision is recorded), training resumes from the registered checkpoint for
    `retrain_steps` more steps, and the result is registered with lineage to the old version and the new
    data. With no new data the run records that and stops.
    """
    from igpt_core.palette import Palette

    summary = PipelineSummary(None, ctx.parent_run_id, ctx.tracking_uri, ctx.root, "retrain")
    mlflow = tracking.client(ctx.tracking_uri)
    name = params.model_name or tracking.MODEL_NAME
    watch = watched_folder(params, ctx.root)
    latest = tracking.latest_version(mlflow, name)
    if latest is None:
        raise StageFailed(
            f"stage retrain failed: model {name!r} has no registered version to continue; run full-pipeline first"
        )

    consumed = consumed_digests(mlflow, name)
    found = {str(path): source_digest(str(path)) for path in list_batches(watch)}
    new = {spec: digest for spec, digest in found.items() if digest not in consumed}
    tracking.set_tags(
        mlflow, ctx.parent_run_id, {"igpt.watch": str(watch), "igpt.base_model": f"{name}/{latest.version}"}
    )
    tracking.log_metrics(mlflow, ctx.parent_run_id, {"batches_seen": len(found), "batches_new": len(new)})
    if not new:
        summary.note = f"no new data in {watch} (batches seen: {len(found)}); nothing to do"
        tracking.set_tags(mlflow, ctx.parent_run_id, {"igpt.retrain": "no new data"})
        return summary

    stages = summary.stages
    checkpoint_dir = tracking.load_registered(
        name,
        latest.version,
        dst=Path(ctx.root) / "registry" / f"{name}-v{latest.version}",
        tracking_uri=ctx.tracking_uri,
    )
    current = Palette.load(checkpoint_dir)
    base_run = mlflow.get_run(latest.run_id)
    palette: dict[str, Any] = {
        "dir": str(checkpoint_dir),
        "palette_digest": current.digest(),
        "clusters": current.clusters,
        "run_id": base_run.data.tags.get("igpt.upstream.palette", latest.run_id),
    }
    from igpt_core.checkpoint import read_config
    from igpt_core.config import ModelConfig, from_dict, to_dict

    saved = read_config(checkpoint_dir)
    model = to_dict(from_dict(ModelConfig, saved))
    resolution = int(model["resolution"])
    base_step = int(saved.get("step", latest.tags.get("igpt.step", 0)))

    batch_digest = ws.digest_of(sorted(new.values()))
    key = ws.digest_of("split", batch_digest, params.heldout_fraction, resolution)
    split = stages["split"] = call_stage(
        split_stage, ctx, "splits", key, new, params.heldout_fraction, resolution
    )
    train_spec, train_digest = split["train"], split["train_digest"]
    held_spec, held_digest = split["heldout"], split["heldout_digest"]

    from flows.splits import quantization_mse

    new_mse = quantization_mse(current, held_spec, resolution)
    base_mse = float(latest.tags.get("igpt.palette_mse", "nan"))
    ratio = new_mse / base_mse if base_mse == base_mse and base_mse > 0 else float("nan")
    reason = (
        "asked" if params.refit else ("drift" if ratio == ratio and ratio > params.drift_threshold else "no")
    )
    tracking.log_metrics(
        mlflow,
        ctx.parent_run_id,
        {"new_quant_mse": new_mse, "base_quant_mse": base_mse, "quant_mse_ratio": ratio},
    )
    tracking.set_tags(mlflow, ctx.parent_run_id, {"igpt.palette_refit": reason})
    up = {"split": split["run_id"]}
    if reason != "no":
        key = ws.digest_of("palette", train_digest, current.clusters, resolution, params.seed)
        palette = stages["palette"] = call_stage(
            palette_stage,
            ctx,
            "palettes",
            key,
            train_spec,
            train_digest,
            current.clusters,
            resolution,
            params.seed,
            held_spec,
            up,
        )
    up = {**up, "palette": palette["run_id"]}
    key = ws.digest_of("shards", train_digest, palette["palette_digest"], resolution, "train")
    shards = stages["tokenize-train"] = call_stage(
        tokenize_stage, ctx, "shards", key, train_spec, train_digest, "train", palette, resolution, up
    )
    key = ws.digest_of("shards", held_digest, palette["palette_digest"], resolution, "test")
    held = stages["tokenize-heldout"] = call_stage(
        tokenize_stage, ctx, "shards", key, held_spec, held_digest, "test", palette, resolution, up
    )

    train = {**_config_dict_train(params, base_step + params.retrain_steps), "workers": params.workers}
    warm = {"checkpoint": str(checkpoint_dir), "model": f"{name}/{latest.version}"}
    key = ws.digest_of(
        "checkpoint", shards["manifest_digest"], model, train, latest.tags.get("igpt.checkpoint_digest")
    )
    up = {"palette": palette["run_id"], "tokenize-train": shards["run_id"], "split": split["run_id"]}
    checkpoint = stages["pretrain"] = call_stage(
        pretrain_stage, ctx, "checkpoints", key, shards, palette, model, train, up, warm
    )
    finish(
        ctx,
        params,
        summary,
        checkpoint,
        shards,
        held,
        extra_tags={
            NEW_DATA_TAG: json.dumps(sorted(new.values())),
            "igpt.parent_model": f"{name}/{latest.version}",
            "igpt.palette_refit": reason,
            "igpt.palette_mse": new_mse if reason != "no" else base_mse,
        },
    )
    summary.note = (
        f"retrained {name} v{latest.version} on {len(new)} new batch(es) in {watch}; palette refit: {reason}"
    )
    return summary


def _config_dict_train(params: PipelineParams, steps: int) -> dict[str, Any]:
    from igpt_core.config import to_dict

    return to_dict(params.build_train_config(steps))

"""The stage tasks of the `igpt` flow and the plumbing they share.

Each stage task calls one igpt_core function, writes into a content-addressed workspace folder (see
flows/workspace.py), records a nested MLflow run with its input datasets and upstream run ids, and
returns a small reference (folder, digest, MLflow run id, a few numbers), never arrays or tensors.
Prefect retries a stage on I/O errors and caches it on its content digest.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy

from flows import workspace as ws
from igpt_core import tracking

CHECKPOINT_FILES = ("model.safetensors", "config.json", "palette.npy", "trainer_state.pt")


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage and the cause (it becomes the flow run's message)."""


@dataclass(frozen=True)
class RunContext:
    """What every stage task needs to place its output and its MLflow run; small and picklable."""

    root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    ray_address: str | None


# ------------------------------------------------------------------------------------ task plumbing


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only on I/O errors (a full disk, a flaky network filesystem); bad input fails at once."""
    error = getattr(state, "data", None)
    while isinstance(error, BaseException):
        if isinstance(error, OSError):
            return True
        error = error.__cause__
    return False


def _cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Prefect's cache key: the stage's content digest, once its folder holds a finished output.

    Keying on the folder's digest means a change to any input (data, palette, config) is a new key,
    and checking the marker means a deleted workspace never serves a reference to missing files.
    """
    ctx: RunContext = parameters["ctx"]
    kind, key = parameters["kind"], parameters["key"]
    if ws.read_done(ws.stage_dir(Path(ctx.root), kind, key)) is None:
        return None
    # The workspace is part of the key: another workspace with the same inputs has its own folders.
    return f"igpt-{kind}-{key}-{ws.digest_of(ctx.root)[:12]}"


def _stage_task(name: str) -> Any:
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=1,
        retry_condition_fn=_transient,
        cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key),
    )


def call_stage(stage_task: Any, ctx: RunContext, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Runs a stage task and returns its reference, `reused` True when Prefect served it from its cache
    or the task found its folder finished. A failed stage raises its StageFailed here."""
    state = stage_task(ctx, *args, return_state=True, **kwargs)
    ref = dict(state.result())
    ref["reused"] = bool(ref.get("reused")) or state.name == "Cached"
    return ref


def run_stage(
    ctx: RunContext,
    stage: str,
    kind: str,
    key: str,
    build: Callable[[Path, str, Any], dict[str, Any]],
    *,
    inputs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    upstream: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    keep_partial: bool = False,
) -> dict[str, Any]:
    """Reuses `<root>/<kind>/<key>` when finished; else runs `build(folder, run_id, mlflow)` in it.

    The stage gets its own MLflow run nested under the pipeline's, with its input datasets and the run
    ids of the upstream stages; a failure closes that run as FAILED with the cause and raises
    StageFailed naming the stage, leaving every earlier stage's folder and run untouched.
    """
    folder = ws.stage_dir(Path(ctx.root), kind, key)
    done = ws.read_done(folder)
    if done is not None:
        return {**done, "reused": True}
    mlflow = tracking.client(ctx.tracking_uri)
    tags = {"igpt.digest": key, **{f"igpt.upstream.{k}": v for k, v in (upstream or {}).items()}}
    run_id = tracking.start_run(
        mlflow, ctx.experiment_id, stage, parent_run_id=ctx.parent_run_id, tags=tags, params=params
    )
    try:
        for item in inputs:
            tracking.log_dataset(mlflow, run_id, **item)
        ws.prepare(folder, keep_partial=keep_partial)
        extra = build(folder, run_id, mlflow)
        ref = {"stage": stage, "dir": str(folder), "digest": key, "run_id": run_id, **extra}
        ws.write_done(folder, ref)
    except BaseException as error:
        cause = f"{type(error).__name__}: {error}"
        tracking.end_run(mlflow, run_id, failed=True, error=cause + "\n" + traceback.format_exc(limit=5))
        raise StageFailed(f"stage {stage} failed: {cause}") from error
    tracking.end_run(mlflow, run_id)
    return {**ref, "reused": False}


def _dataset(name: str, digest: str, context: str, kind: str, spec: str | None = None) -> dict[str, Any]:
    return {"name": name, "digest": digest, "context": context, "kind": kind, "spec": spec}


def _shards_input(ref: dict[str, Any], context: str) -> dict[str, Any]:
    digest = ref["manifest_digest"]
    return _dataset(f"shards-{digest[:12]}", digest, context, "shards", ref["dir"])


def _palette_input(ref: dict[str, Any]) -> dict[str, Any]:
    digest = ref["palette_digest"]
    return _dataset(f"palette-{digest[:12]}", digest, "palette", "palette", ref["dir"])


def _checkpoint_input(ref: dict[str, Any]) -> dict[str, Any]:
    return _dataset(
        f"checkpoint-{ref['digest'][:12]}", ref["digest"], "model", "checkpoint", ref["checkpoint"]
    )


# ------------------------------------------------------------------------------------------ stages


@task(name="source-digest", retries=2, retry_delay_seconds=1, retry_condition_fn=_transient)
def source_digest(spec: str) -> str:
    """The content digest of a source (sha256 over its raw bytes). Never cached: a folder's contents can
    change under the same name, and this digest is how the change is seen."""
    from igpt_core.sources import open_source

    return str(open_source(spec).digest())


@_stage_task("split")
def split_stage(
    ctx: RunContext, kind: str, key: str, sources: dict[str, str], fraction: float, resolution: int
) -> dict[str, Any]:
    """Splits sources (spec -> digest) deterministically, by a hash of each image key, into train.npz and
    heldout.npz at `resolution`."""
    from flows.splits import split_source

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        counts = split_source(list(sources), folder, fraction=fraction, resolution=resolution)
        tracking.log_metrics(mlflow, run_id, counts)
        return {
            "train": str(folder / "train.npz"),
            "heldout": str(folder / "heldout.npz"),
            "train_digest": source_digest.fn(str(folder / "train.npz")),
            "heldout_digest": source_digest.fn(str(folder / "heldout.npz")),
            "counts": counts,
        }

    return run_stage(
        ctx,
        "split",
        kind,
        key,
        build,
        inputs=[_dataset(spec, digest, "source", "source", spec) for spec, digest in sources.items()],
        params={"sources": sorted(sources), "heldout_fraction": fraction, "resolution": resolution},
    )


@_stage_task("palette")
def palette_stage(
    ctx: RunContext,
    kind: str,
    key: str,
    spec: str,
    digest: str,
    clusters: int,
    resolution: int,
    seed: int,
    heldout: str | None,
    upstream: dict[str, str],
) -> dict[str, Any]:
    """Fits the K-colour palette on the training images; logs the swatch and the held-out quantization MSE."""
    from flows.splits import quantization_mse
    from igpt_core.palette import fit_palette

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        palette = fit_palette(
            spec,
            clusters=clusters,
            seed=seed,
            resolution=resolution,
            ray_address=ctx.ray_address,
            progress=False,
        )
        palette.save(
            folder, {"source": spec, "source_digest": digest, "seed": seed, "resolution": resolution}
        )
        metrics: dict[str, float] = {}
        if heldout is not None:
            metrics["heldout_quant_mse"] = quantization_mse(palette, heldout, resolution)
        tracking.log_metrics(mlflow, run_id, metrics)
        for name in ("palette.png", "palette.json", "palette.npy"):
            if (folder / name).exists():
                tracking.log_artifact(mlflow, run_id, folder / name, "palette")
        return {"palette_digest": palette.digest(), "clusters": palette.clusters, "metrics": metrics}

    return run_stage(
        ctx,
        "palette",
        kind,
        key,
        build,
        inputs=[_dataset(spec, digest, "train", "source", spec)],
        upstream=upstream,
        params={"source": spec, "clusters": clusters, "resolution": resolution, "seed": seed},
    )


@_stage_task("tokenize")
def tokenize_stage(
    ctx: RunContext,
    kind: str,
    key: str,
    spec: str,
    digest: str,
    split: str,
    palette: dict[str, Any],
    resolution: int,
    upstream: dict[str, str],
) -> dict[str, Any]:
    """Quantizes one source with the palette into webdataset shards (`split`-NNNNNN.tar)."""
    from igpt_core.tokens import tokenize

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        result = tokenize(
            spec,
            palette["dir"],
            folder,
            resolution=resolution,
            split=split,
            ray_address=ctx.ray_address,
            progress=False,
        )
        counts = result.counts
        tracking.log_metrics(mlflow, run_id, {f"{k}": v for k, v in counts.items()})
        tracking.log_metrics(mlflow, run_id, {f"seconds_{k}": v for k, v in result.seconds.items()})
        for name in ("meta.json", "manifest.parquet"):
            if (folder / name).exists():
                tracking.log_artifact(mlflow, run_id, folder / name, "shards")
        return {"manifest_digest": result.manifest_digest, "split": split, "counts": counts}

    stage = f"tokenize-{'train' if split == 'train' else 'heldout'}"
    return run_stage(
        ctx,
        stage,
        kind,
        key,
        build,
        inputs=[
            _dataset(spec, digest, split, "source", spec),
            _palette_input(palette),
        ],
        upstream=upstream,
        params={"source": spec, "split": split, "resolution": resolution},
    )


@_stage_task("pretrain")
def pretrain_stage(
    ctx: RunContext,
    kind: str,
    key: str,
    shards: dict[str, Any],
    palette: dict[str, Any],
    model: dict[str, Any],
    train: dict[str, Any],
    upstream: dict[str, str],
    warm_start: dict[str, Any] | None = None,
    eval_shards: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains the transformer with Ray Train on the train shards; logs curves, the loss PNG and the checkpoint.

    `warm_start` (retraining) is {"checkpoint": folder, "model": "<name>/<version>"}: training starts from
    that checkpoint's weights (`pretrain(init_from=...)`) and continues its step count to `train["steps"]`.
    `eval_shards` (a tokenize stage's result) is the held-out set training evaluates on; None: samples
    held back from the train shards. The caller's cache key must then include its manifest digest.
    """
    from igpt_core.checkpoint import read_config
    from igpt_core.config import ModelConfig, TrainConfig, from_dict
    from igpt_core.pretrain import pretrain

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        init_from = None if warm_start is None else Path(warm_start["checkpoint"])
        start_step = 0 if init_from is None else int(read_config(init_from).get("step", 0))
        result = pretrain(
            shards["dir"],
            folder,
            model=from_dict(ModelConfig, model),
            train=from_dict(TrainConfig, train),
            palette_dir=palette["dir"],
            ray_address=ctx.ray_address,
            run_name=f"igpt-{key[:12]}",
            init_from=init_from,
            eval_shards=None if eval_shards is None else eval_shards["dir"],
        )
        tracking.log_history(mlflow, run_id, result.history)
        tracking.log_metrics(mlflow, run_id, result.metrics, step=result.step)
        curve = tracking.save_curve_png(result.history, folder / "loss.png")
        if curve is not None:
            tracking.log_artifact(mlflow, run_id, curve)
        # The checkpoint itself (weights, config, palette, trainer state): not Ray's run storage beside it.
        for item in sorted(Path(result.checkpoint_dir).iterdir()):
            if item.is_file() and item.name in CHECKPOINT_FILES:
                tracking.log_artifact(mlflow, run_id, item, tracking.CHECKPOINT_ARTIFACT)
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        return {
            "checkpoint": str(result.checkpoint_dir),
            "step": int(result.step),
            "start_step": start_step,
            "metrics": metrics,
            "palette_digest": palette["palette_digest"],
            "shards_digest": shards["manifest_digest"],
        }

    inputs = [
        _shards_input(shards, "train"),
        _palette_input(palette),
    ]
    if eval_shards is not None:
        inputs.append(_shards_input(eval_shards, "heldout"))
    tags = dict(upstream)
    if warm_start is not None:
        tags["model"] = warm_start["model"]
    return run_stage(
        ctx,
        "pretrain",
        kind,
        key,
        build,
        inputs=inputs,
        upstream=tags,
        params={**{f"model.{k}": v for k, v in model.items()}, **{f"train.{k}": v for k, v in train.items()}},
        keep_partial=True,
    )


@_stage_task("probe")
def probe_stage(
    ctx: RunContext,
    kind: str,
    key: str,
    checkpoint: dict[str, Any],
    train: dict[str, Any],
    heldout: dict[str, Any],
    upstream: dict[str, str],
    limit: int | None = None,
) -> dict[str, Any]:
    """Linear probe of the checkpoint (train shards -> held-out shards, at most `limit` images of each)
    next to its two baselines."""
    from igpt_core.config import ProbeConfig
    from igpt_core.probe import run_probe

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        result = run_probe(
            checkpoint["checkpoint"],
            train["dir"],
            heldout["dir"],
            ProbeConfig(max_train=limit, max_test=limit),
            out_dir=folder,
        )
        summary = {
            "accuracy": float(result["accuracy"]["test"]),
            "random_init": float(result["baselines"]["random_init"]["accuracy"]["test"]),
            "raw_pixels": float(result["baselines"]["raw_pixels"]["accuracy"]["test"]),
            "layer": int(result["layer"]),
        }
        tracking.log_metrics(mlflow, run_id, {f"probe_{k}": v for k, v in summary.items()})
        for name in ("probe.json", "probe.md"):
            if (folder / name).exists():
                tracking.log_artifact(mlflow, run_id, folder / name)
        return {"probe": summary}

    return run_stage(
        ctx,
        "probe",
        kind,
        key,
        build,
        inputs=[
            _checkpoint_input(checkpoint),
            _shards_input(train, "train"),
            _shards_input(heldout, "heldout"),
        ],
        upstream=upstream,
    )


@_stage_task("samples")
def samples_stage(
    ctx: RunContext,
    kind: str,
    key: str,
    checkpoint: dict[str, Any],
    heldout: dict[str, Any] | None,
    n: int,
    seed: int,
    upstream: dict[str, str],
) -> dict[str, Any]:
    """Unconditional samples and completions of held-out images, as PNG grids."""
    from igpt_core.sample import complete_images, sample_images, save_completion_grid, save_grid

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        images = sample_images(checkpoint["checkpoint"], n, seed=seed)
        grid = save_grid(images, folder / "samples.png")
        tracking.log_artifact(mlflow, run_id, grid, "samples")
        ref: dict[str, Any] = {"sample_grid": str(grid)}
        if heldout is not None:
            originals, completions = complete_images(
                checkpoint["checkpoint"], heldout["dir"], min(8, n), seed=seed
            )
            completed = save_completion_grid(originals, completions, folder / "completions.png")
            tracking.log_artifact(mlflow, run_id, completed, "samples")
            ref["completion_grid"] = str(completed)
        return ref

    inputs = [_checkpoint_input(checkpoint)]
    if heldout is not None:
        inputs.append(_shards_input(heldout, "heldout"))
    return run_stage(
        ctx, "samples", kind, key, build, inputs=inputs, upstream=upstream, params={"n": n, "seed": seed}
    )


@task(name="register", retries=2, retry_delay_seconds=1, retry_condition_fn=_transient)
def register_stage(ctx: RunContext, name: str, checkpoint: dict[str, Any], tags: dict[str, Any]) -> str:
    """Registers the pretrain run's checkpoint as a version of `name`, once: a rerun that reused the
    checkpoint finds the version already made from that run and returns it."""
    mlflow = tracking.client(ctx.tracking_uri)
    existing = tracking.version_for_run(mlflow, name, checkpoint["run_id"])
    if existing is not None:
        return existing
    return tracking.register_model(mlflow, checkpoint["run_id"], name=name, tags=tags)

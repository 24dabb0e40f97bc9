"""The stage tasks of the `igpt` flow, one per stage, each taking keyword arguments only.

Each stage task calls one igpt_core function, writes into a content-addressed workspace folder (see
flows/workspace.py), records a nested MLflow run with its input datasets and upstream run ids, and
returns a typed reference (flows/refs.py). How a stage runs, retries and is reused is flows/runner.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from flows.refs import (
    CheckpointRef,
    PaletteRef,
    ProbeRef,
    SamplesRef,
    ShardsRef,
    SplitRef,
    StageRef,
    WarmStart,
)
from flows.runner import (
    RunContext,
    StageFailed,
    checkpoint_input,
    dataset,
    palette_input,
    run_stage,
    shards_input,
    stage_task,
    transient,
)
from igpt_core import tracking
from igpt_core.checkpoint import CHECKPOINT_FILES, read_config
from igpt_core.config import ModelConfig, ProbeConfig, TrainConfig, to_dict
from igpt_core.palette_fit import fit_palette
from igpt_core.pretrain import pretrain
from igpt_core.probe import run_probe
from igpt_core.retrain import quantization_mse
from igpt_core.sample import complete_images, sample_images, save_completion_grid, save_grid
from igpt_core.sources import open_source
from igpt_core.split import split_source
from igpt_core.tokens import tokenize

__all__ = [
    "RunContext",
    "StageFailed",
    "palette_stage",
    "pretrain_stage",
    "probe_stage",
    "register_stage",
    "samples_stage",
    "source_digest",
    "split_stage",
    "tokenize_stage",
]


# ------------------------------------------------------------------------------------------ stages


@task(name="source-digest", retries=2, retry_delay_seconds=1, retry_condition_fn=transient)
def source_digest(spec: str) -> str:
    """The content digest of a source (sha256 over its raw bytes). Never cached: a folder's contents can
    change under the same name, and this digest is how the change is seen."""
    return str(open_source(spec).digest())


@stage_task("split")
def split_stage(
    *, ctx: RunContext, key: str, sources: dict[str, str], fraction: float, resolution: int
) -> SplitRef:
    """Splits sources (spec -> digest) deterministically, by a hash of each image key, into train.npz and
    heldout.npz at `resolution`."""

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
        SplitRef,
        "split",
        "splits",
        key,
        build,
        inputs=[dataset(spec, digest, "source", "source", spec) for spec, digest in sources.items()],
        params={"sources": sorted(sources), "heldout_fraction": fraction, "resolution": resolution},
    )


@stage_task("palette")
def palette_stage(
    *,
    ctx: RunContext,
    key: str,
    source: str,
    digest: str,
    clusters: int,
    resolution: int,
    seed: int,
    heldout: str | None,
    upstream: dict[str, str],
) -> PaletteRef:
    """Fits the K-colour palette on the training images; logs the swatch and the held-out quantization MSE."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        palette = fit_palette(
            source,
            clusters=clusters,
            seed=seed,
            resolution=resolution,
            ray_address=ctx.ray_address,
            progress=False,
        )
        palette.save(
            folder, {"source": source, "source_digest": digest, "seed": seed, "resolution": resolution}
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
        PaletteRef,
        "palette",
        "palettes",
        key,
        build,
        inputs=[dataset(source, digest, "train", "source", source)],
        upstream=upstream,
        params={"source": source, "clusters": clusters, "resolution": resolution, "seed": seed},
    )


@stage_task("tokenize")
def tokenize_stage(
    *,
    ctx: RunContext,
    key: str,
    source: str,
    digest: str,
    split: str,
    palette: PaletteRef,
    resolution: int,
    upstream: dict[str, str],
) -> ShardsRef:
    """Quantizes one source with the palette into webdataset shards (`split`-NNNNNN.tar)."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        result = tokenize(
            source,
            palette.dir,
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

    return run_stage(
        ctx,
        ShardsRef,
        f"tokenize-{'train' if split == 'train' else 'heldout'}",
        "shards",
        key,
        build,
        inputs=[dataset(source, digest, split, "source", source), palette_input(palette)],
        upstream=upstream,
        params={"source": source, "split": split, "resolution": resolution},
    )


@stage_task("pretrain")
def pretrain_stage(
    *,
    ctx: RunContext,
    key: str,
    shards: ShardsRef,
    palette: PaletteRef,
    model: ModelConfig,
    train: TrainConfig,
    upstream: dict[str, str],
    warm_start: WarmStart | None = None,
    eval_shards: ShardsRef | None = None,
) -> CheckpointRef:
    """Trains the transformer with Ray Train on the train shards; logs curves, the loss PNG and the checkpoint.

    With `warm_start` (retraining) training starts from that checkpoint's weights
    (`pretrain(init_from=...)`) and continues its step count to `train.steps`. `eval_shards` is the
    held-out set training evaluates on; None: samples held back from the train shards. The caller's key
    must then include its manifest digest.
    """

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        init_from = None if warm_start is None else Path(warm_start.checkpoint)
        start_step = 0 if init_from is None else int(read_config(init_from).get("step", 0))
        with tracking.system_metrics(mlflow, run_id):  # CPU, memory, GPU as system/* metrics
            result = pretrain(
                shards.dir,
                folder,
                model=model,
                train=train,
                palette_dir=palette.dir,
                ray_address=ctx.ray_address,
                run_name=f"igpt-{key[:12]}",
                init_from=init_from,
                eval_shards=None if eval_shards is None else eval_shards.dir,
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
            "palette_digest": palette.palette_digest,
            "shards_digest": shards.manifest_digest,
        }

    inputs = [shards_input(shards, "train"), palette_input(palette)]
    if eval_shards is not None:
        inputs.append(shards_input(eval_shards, "heldout"))
    tags = dict(upstream)
    if warm_start is not None:
        tags["model"] = warm_start.model
    model_params, train_params = to_dict(model), to_dict(train)
    return run_stage(
        ctx,
        CheckpointRef,
        "pretrain",
        "checkpoints",
        key,
        build,
        inputs=inputs,
        upstream=tags,
        params={
            **{f"model.{k}": v for k, v in model_params.items()},
            **{f"train.{k}": v for k, v in train_params.items()},
        },
        keep_partial=True,
    )


@stage_task("probe")
def probe_stage(
    *,
    ctx: RunContext,
    key: str,
    checkpoint: CheckpointRef,
    train: ShardsRef,
    heldout: ShardsRef,
    upstream: dict[str, str],
    limit: int | None = None,
) -> ProbeRef:
    """Linear probe of the checkpoint (train shards -> held-out shards, at most `limit` images of each, a
    seeded sample stratified by class) next to its two baselines."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        result = run_probe(
            checkpoint.checkpoint,
            train.dir,
            heldout.dir,
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
        ProbeRef,
        "probe",
        "probes",
        key,
        build,
        inputs=[
            checkpoint_input(checkpoint),
            shards_input(train, "train"),
            shards_input(heldout, "heldout"),
        ],
        upstream=upstream,
    )


@stage_task("samples")
def samples_stage(
    *,
    ctx: RunContext,
    key: str,
    checkpoint: CheckpointRef,
    heldout: ShardsRef | None,
    n: int,
    seed: int,
    upstream: dict[str, str],
) -> SamplesRef:
    """Unconditional samples and completions of held-out images, as PNG grids."""

    def build(folder: Path, run_id: str, mlflow: Any) -> dict[str, Any]:
        images = sample_images(checkpoint.checkpoint, n, seed=seed)
        grid = save_grid(images, folder / "samples.png")
        tracking.log_artifact(mlflow, run_id, grid, "samples")
        ref: dict[str, Any] = {"sample_grid": str(grid)}
        if heldout is not None:
            originals, completions = complete_images(checkpoint.checkpoint, heldout.dir, min(8, n), seed=seed)
            completed = save_completion_grid(originals, completions, folder / "completions.png")
            tracking.log_artifact(mlflow, run_id, completed, "samples")
            ref["completion_grid"] = str(completed)
        return ref

    inputs = [checkpoint_input(checkpoint)]
    if heldout is not None:
        inputs.append(shards_input(heldout, "heldout"))
    return run_stage(
        ctx,
        SamplesRef,
        "samples",
        "samples",
        key,
        build,
        inputs=inputs,
        upstream=upstream,
        params={"n": n, "seed": seed},
    )


@task(name="register", retries=2, retry_delay_seconds=1, retry_condition_fn=transient)
def register_stage(*, ctx: RunContext, name: str, checkpoint: StageRef, tags: dict[str, Any]) -> str:
    """Registers the checkpoint a stage's run logged (pretrain; finetune's classifier) as a version of
    `name`, once: a rerun that reused the checkpoint finds the version already made from that run."""
    mlflow = tracking.client(ctx.tracking_uri)
    existing = tracking.version_for_run(mlflow, name, checkpoint.run_id)
    if existing is not None:
        return existing
    return tracking.register_model(mlflow, checkpoint.run_id, name=name, tags=tags)

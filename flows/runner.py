"""How one stage task runs: its context, its retry condition, the workspace check that is its cache,
its nested MLflow run, and the StageFailed a failure becomes. The stage tasks are in flows/stages.py.

Caching is the workspace's alone: a stage whose folder holds a finished marker returns the reference
saved there (`reused`) without a new MLflow run, whichever run, retry or machine asks. Prefect does not
cache stage results itself, so a deleted workspace is simply redone. Prefect retries a stage on I/O errors;
a retry finds what the failed attempt finished.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from flows import workspace as ws
from flows.refs import CheckpointRef, PaletteRef, ShardsRef, StageRef
from igpt_core import tracking

P = ParamSpec("P")
R = TypeVar("R")
Ref = TypeVar("Ref", bound=StageRef)


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


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only on I/O errors (a full disk, a flaky network filesystem); bad input fails at once."""
    error = getattr(state, "data", None)
    while isinstance(error, BaseException):
        if isinstance(error, OSError):
            return True
        error = error.__cause__
    return False


def stage_task(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A stage task: retried on I/O errors, never cached by Prefect (the workspace marker decides)."""
    return task(
        name=name,
        retries=2,
        retry_delay_seconds=1,
        retry_condition_fn=transient,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


def finished(ctx: RunContext, ref_type: type[Ref], kind: str, key: str) -> Ref | None:
    """The reference of `<root>/<kind>/<key>` when that folder is finished, else None (also for a marker
    that does not read as `ref_type`: the stage is redone)."""
    done = ws.read_done(ws.stage_dir(Path(ctx.root), kind, key))
    if done is None:
        return None
    try:
        return ref_type.model_validate(done)
    except ValidationError:
        return None


def run_stage(
    ctx: RunContext,
    ref_type: type[Ref],
    stage: str,
    kind: str,
    key: str,
    build: Callable[[Path, str, Any], dict[str, Any]],
    *,
    inputs: list[dict[str, Any]] | None = None,
    upstream: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    keep_partial: bool = False,
) -> Ref:
    """Reuses `<root>/<kind>/<key>` when finished; else runs `build(folder, run_id, mlflow)` in it, whose
    dict completes the reference.

    The stage gets its own MLflow run nested under the pipeline's, with its input datasets and the run
    ids of the upstream stages; a failure closes that run as FAILED with the cause and raises
    StageFailed naming the stage, leaving every earlier stage's folder and run untouched.
    """
    done = finished(ctx, ref_type, kind, key)
    if done is not None:
        return done.as_reused()
    folder = ws.stage_dir(Path(ctx.root), kind, key)
    mlflow = tracking.client(ctx.tracking_uri)
    tags = {"igpt.digest": key, **{f"igpt.upstream.{k}": v for k, v in (upstream or {}).items()}}
    run_id = tracking.start_run(
        mlflow, ctx.experiment_id, stage, parent_run_id=ctx.parent_run_id, tags=tags, params=params
    )
    try:
        for item in inputs or []:
            tracking.log_dataset(mlflow, run_id, **item)
        ws.prepare(folder, keep_partial=keep_partial)
        extra = build(folder, run_id, mlflow)
        ref = ref_type(stage=stage, dir=str(folder), digest=key, run_id=run_id, **extra)
        ws.write_done(folder, ref.marker())
    except BaseException as error:
        cause = f"{type(error).__name__}: {error}"
        tracking.end_run(mlflow, run_id, failed=True, error=cause + "\n" + traceback.format_exc(limit=5))
        raise StageFailed(f"stage {stage} failed: {cause}") from error
    tracking.end_run(mlflow, run_id)
    return ref


def dataset(name: str, digest: str, context: str, kind: str, spec: str | None = None) -> dict[str, Any]:
    return {"name": name, "digest": digest, "context": context, "kind": kind, "spec": spec}


def shards_input(ref: ShardsRef, context: str) -> dict[str, Any]:
    digest = ref.manifest_digest
    return dataset(f"shards-{digest[:12]}", digest, context, "shards", ref.dir)


def palette_input(ref: PaletteRef) -> dict[str, Any]:
    digest = ref.palette_digest
    return dataset(f"palette-{digest[:12]}", digest, "palette", "palette", ref.dir)


def checkpoint_input(ref: CheckpointRef) -> dict[str, Any]:
    return dataset(f"checkpoint-{ref.digest[:12]}", ref.digest, "model", "checkpoint", ref.checkpoint)

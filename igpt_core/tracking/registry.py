"""The MLflow model registry: registering a checkpoint folder as a model version, finding and loading versions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igpt_core.tracking.runs import TrackingError, client, log_artifact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MODEL_NAME = "igpt"
CLASSIFIER_NAME = "igpt-classifier"
"""The fine-tuned classifiers' registered model (the pipeline's finetune stage)."""
CHECKPOINT_ARTIFACT = "checkpoint"
MODEL_ARTIFACT = "model"
"""The run artifact holding a version's MLflow Model (pyfunc; its own copy of the checkpoint's model files)."""
_DESCRIPTIONS = {
    MODEL_NAME: "ImageGPT checkpoints trained by the igpt pipeline",
    CLASSIFIER_NAME: "ImageGPT classifiers fine-tuned by the igpt pipeline from a registered igpt version",
}


def register_model(
    mlflow: MlflowClient,
    run_id: str,
    *,
    name: str = MODEL_NAME,
    tags: Mapping[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    description: str | None = None,
) -> str:
    """Registers run `run_id`'s checkpoint as a new version of `name` that is an MLflow Model; returns the version.

    The run's `checkpoint` artifact folder stays what `load_registered` gives back: exactly the folder
    `igpt sample --checkpoint` reads (its files are named in `igpt_core.checkpoint`; a classifier's is
    what `load_classifier` reads). Beside it the run gets `model`, the pyfunc model of that checkpoint
    (`igpt_core.tracking.pyfunc`), and the version's source is `runs:/<run>/model`, so
    `mlflow.pyfunc.load_model("models:/<name>/<version>")` and `mlflow models serve` take it.
    Pass `checkpoint_dir` when the run has not logged the checkpoint yet. `description` is the
    registered model's when this creates it (default: the pipeline's wording for `igpt` and `igpt-classifier`).
    """
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    from igpt_core.tracking.pyfunc import log_pyfunc  # heavy: mlflow

    if checkpoint_dir is not None:
        log_artifact(mlflow, run_id, checkpoint_dir, CHECKPOINT_ARTIFACT)
    log_pyfunc(mlflow, run_id, MODEL_ARTIFACT, checkpoint_dir, CHECKPOINT_ARTIFACT)
    try:
        mlflow.create_registered_model(
            name, description=description or _DESCRIPTIONS.get(name, _DESCRIPTIONS[MODEL_NAME])
        )
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = mlflow.create_model_version(
        name,
        source=f"runs:/{run_id}/{MODEL_ARTIFACT}",
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    return str(version.version)


def version_for_run(mlflow: MlflowClient, name: str, run_id: str) -> str | None:
    """The version of `name` registered from run `run_id`, if there is one (so a rerun registers once)."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        versions = mlflow.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return str(min(int(v.version) for v in versions)) if versions else None


def all_versions(mlflow: MlflowClient, name: str = MODEL_NAME) -> list[Any]:
    """Every ModelVersion of `name`, oldest first (empty when the model is not registered)."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        versions = mlflow.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    return sorted(versions, key=lambda v: int(v.version))


def latest_version(mlflow: MlflowClient, name: str = MODEL_NAME) -> Any | None:
    """The newest ModelVersion of `name` (highest version number), or None when none is registered."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        versions = mlflow.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def load_registered(
    name: str = MODEL_NAME,
    version: str | int | None = None,
    *,
    dst: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Downloads registered model `name` at `version` (None: the newest) and returns its checkpoint folder
    (the run's `checkpoint` artifact, trainer state included; the MLflow Model is `models:/<name>/<version>`)."""
    mlflow = client(tracking_uri)
    if version is None:
        latest = latest_version(mlflow, name)
        if latest is None:
            raise TrackingError(f"model {name!r}: no registered version in {mlflow.tracking_uri}")
        version = latest.version
    model_version = get_version(mlflow, name, str(version))
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"igpt-{name}-v{version}-"))
    target.mkdir(parents=True, exist_ok=True)
    # Through the client: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to this process.
    local = mlflow.download_artifacts(model_version.run_id, CHECKPOINT_ARTIFACT, str(target))
    return Path(local)


def get_version(mlflow: MlflowClient, name: str, version: str) -> Any:
    """The ModelVersion `name`/`version`; TrackingError when there is none."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        return mlflow.get_model_version(name, version)
    except MlflowException as error:
        raise TrackingError(f"model {name!r} version {version}: not found ({error.error_code})") from None

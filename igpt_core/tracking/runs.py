"""MLflow run bookkeeping: the client, the experiment, runs and their params, metrics, artifacts, datasets.

Everything goes through an explicit `MlflowClient` and run ids, never MLflow's thread-local "active run":
pipeline stages run in Prefect task threads and worker processes, and a run id is the one reference that
survives all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from igpt_core import __version__

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EXPERIMENT = "igpt"
# MLflow stores a dataset digest in a 36-character column; the full sha256 goes into an input tag.
_DIGEST_CHARS = 32
_PARAM_CHARS = 6000


class TrackingError(ValueError):
    """A reference (model version, run id) does not exist, or a record is missing something needed."""


def default_tracking_uri(workspace: str | os.PathLike[str]) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store `mlflow.db` in the workspace."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str((Path(workspace) / "mlflow.db").resolve())


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client for `tracking_uri` (default: MLFLOW_TRACKING_URI, else ./igpt-home/mlflow.db)."""
    from mlflow.tracking import MlflowClient  # heavy: mlflow

    uri = tracking_uri or default_tracking_uri(os.environ.get("IGPT_HOME", "igpt-home"))
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def code_version() -> str:
    """The git commit of the checkout this code runs from (with `+dirty`), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"igpt=={__version__}"


def ensure_experiment(mlflow: MlflowClient, name: str, artifact_root: str | os.PathLike[str] | None) -> str:
    """The id of experiment `name`, created with artifacts under `artifact_root` when it is new.

    A local SQLite store would otherwise put artifacts in ./mlruns of whatever directory the process
    happens to run in; a server (artifact_root None) decides for itself.
    """
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    try:
        return str(mlflow.create_experiment(name, artifact_location=location))
    except Exception:
        # Two processes may create it at once; the loser reads the winner's.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def start_run(
    mlflow: MlflowClient,
    experiment_id: str,
    stage: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Creates a run (nested under `parent_run_id` when given), logs `params`, returns its id."""
    all_tags = {"igpt.stage": stage, "igpt.code_version": code_version(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.create_run(experiment_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
    run_id = str(run.info.run_id)
    if params:
        log_params(mlflow, run_id, params)
    return run_id


def log_params(mlflow: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Logs flat params; nested values are written as JSON (MLflow params are strings)."""
    from mlflow.entities import Param  # heavy: mlflow

    items = [
        Param(
            str(k), (v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))[:_PARAM_CHARS]
        )
        for k, v in params.items()
    ]
    for start in range(0, len(items), 100):  # MLflow's batch limit for params
        mlflow.log_batch(run_id, params=items[start : start + 100])


def log_metrics(mlflow: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Logs the numeric entries of `metrics` at `step` (others are skipped)."""
    from mlflow.entities import Metric  # heavy: mlflow

    now = int(time.time() * 1000)
    items = [
        Metric(str(k), float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    for start in range(0, len(items), 1000):
        mlflow.log_batch(run_id, metrics=items[start : start + 1000])


def log_history(mlflow: MlflowClient, run_id: str, history: Iterable[Mapping[str, Any]]) -> None:
    """Logs a training curve: each entry's numeric values at the entry's `step`."""
    for entry in history:
        step = int(entry.get("step", 0))
        log_metrics(mlflow, run_id, {k: v for k, v in entry.items() if k != "step"}, step=step)


def log_dataset(
    mlflow: MlflowClient,
    run_id: str,
    *,
    name: str,
    digest: str,
    context: str,
    kind: str,
    spec: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Records an input of `run_id` as an MLflow dataset carrying our content `digest` (not MLflow's own).

    `kind` says what the digest is of (source, palette, shards, checkpoint); `context` is MLflow's input
    role (train, heldout, palette, ...). The full digest and `kind` go into input tags for the lineage walk.
    """
    from mlflow.data.meta_dataset import MetaDataset  # heavy: mlflow
    from mlflow.entities import DatasetInput, InputTag  # heavy: mlflow

    dataset = MetaDataset(  # type: ignore[abstract]
        _IgptDatasetSource(spec or name, kind, dict(extra or {})), name=name, digest=digest[:_DIGEST_CHARS]
    )
    tags = [
        InputTag("mlflow.data.context", context),
        InputTag("igpt.kind", kind),
        InputTag("igpt.digest", digest),
    ]
    mlflow.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def log_artifact(
    mlflow: MlflowClient, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None
) -> None:
    """Uploads a file or a whole folder to the run's artifacts."""
    path = Path(path)
    if not path.exists():
        raise TrackingError(f"artifact {path}: no such file or folder")
    if path.is_dir():
        mlflow.log_artifacts(run_id, str(path), artifact_path)
    else:
        mlflow.log_artifact(run_id, str(path), artifact_path)


def set_tags(mlflow: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, str(value))


SYSTEM_METRICS_INTERVAL_S = 10.0
"""Seconds between samples of the machine's CPU, memory, disk, network and GPU in a run's system/*
metrics (MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)."""


@contextlib.contextmanager
def system_metrics(
    mlflow: MlflowClient, run_id: str, *, interval_s: float = SYSTEM_METRICS_INTERVAL_S
) -> Iterator[None]:
    """Logs MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
    disk and network, and `system/gpu_*` when pynvml finds an NVIDIA GPU) to `run_id` while the block runs.

    These are the machine of this process (the driver; on a one-machine run also its workers). One
    sample is also taken when the block ends, so a run shorter than `interval_s` still has its figures.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # heavy: mlflow

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=mlflow.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        monitor.collect_metrics()  # the closing sample (averaged with any not yet logged)
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def end_run(mlflow: MlflowClient, run_id: str, *, failed: bool = False, error: str | None = None) -> None:
    """Closes a run; a failed one keeps `error` as the tag `igpt.error` so the UI shows the cause."""
    if error:
        mlflow.set_tag(run_id, "igpt.error", error[:5000])
    mlflow.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def save_curve_png(
    history: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, size: tuple[int, int] = (480, 300)
) -> Path | None:
    """Draws the loss curves of a training history (every key containing "loss", against `step`) as a
    PNG; returns None when the history has no loss values. PIL only: no plotting library is needed."""
    rows = [dict(r) for r in history]
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, int | float)})
    series = {k: [(float(r.get("step", i)), float(r[k])) for i, r in enumerate(rows) if k in r] for k in keys}
    points = [p for values in series.values() for p in values]
    if not points:
        return None
    width, height = size
    margin = 36
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 8, width - 8, height - margin], outline="black")

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (x - x0) / (x1 - x0) * (width - margin - 8),
            height - margin - (y - y0) / (y1 - y0) * (height - margin - 8),
        )

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for index, (key, values) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        if len(values) > 1:
            draw.line([xy(*p) for p in values], fill=colour, width=2)
        draw.text((margin + 6, 12 + 12 * index), key, fill=colour)
    draw.text((2, 8), f"{y1:.3g}", fill="black")
    draw.text((2, height - margin - 10), f"{y0:.3g}", fill="black")
    draw.text((margin, height - margin + 4), f"step {x0:g}", fill="black")
    draw.text((width - 90, height - margin + 4), f"step {x1:g}", fill="black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


def _make_source_class() -> type:
    from mlflow.data.dataset_source import DatasetSource  # heavy: mlflow

    class IgptDatasetSource(DatasetSource):
        """Where an igpt input came from: the user's source spec or a workspace folder, and what it is."""

        def __init__(self, spec: str, kind: str, extra: dict[str, Any]) -> None:
            self.spec, self.kind, self.extra = spec, kind, extra

        @staticmethod
        def _get_source_type() -> str:
            return "igpt"

        def load(self) -> Any:
            raise NotImplementedError("igpt datasets are read with igpt_core.sources / igpt_core.shards")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> IgptDatasetSource:
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"spec": self.spec, "kind": self.kind, **self.extra}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> IgptDatasetSource:
            rest = {k: v for k, v in source_dict.items() if k not in ("spec", "kind")}
            return cls(source_dict.get("spec", ""), source_dict.get("kind", ""), rest)

    return IgptDatasetSource


def _IgptDatasetSource(spec: str, kind: str, extra: dict[str, Any]) -> Any:
    # Built on first use: MLflow is imported only when tracking is used, never at import time.
    global _SOURCE_CLASS
    if _SOURCE_CLASS is None:
        _SOURCE_CLASS = _make_source_class()
    return _SOURCE_CLASS(spec, kind, extra)


_SOURCE_CLASS: type | None = None

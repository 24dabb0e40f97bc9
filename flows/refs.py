"""The typed references stage tasks return: small, frozen, JSON-ready (a folder, digests, an MLflow run
id, a few numbers), never arrays or tensors.

A finished stage folder's marker (`_stage.json`, flows/workspace.py) is its reference's JSON, so a later
run reads the same reference back. `reused` says whether this run made it or found it finished; it is a
fact of the run, not of the output, so the marker leaves it out.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class StageRef(BaseModel):
    """What every stage output has: its stage name, its workspace folder and content digest (the folder's
    name), the MLflow run that made it."""

    # Unknown keys are ignored so a marker written with extra fields still reads.
    model_config = ConfigDict(frozen=True, extra="ignore")

    stage: str
    dir: str
    digest: str
    run_id: str
    reused: bool = False

    def marker(self) -> dict[str, Any]:
        """The JSON the workspace marker stores (everything but `reused`)."""
        return self.model_dump(mode="json", exclude={"reused"})

    def as_reused(self) -> Self:
        """This reference, marked as found finished rather than made by this run."""
        return self.model_copy(update={"reused": True})


class SplitRef(StageRef):
    """`train.npz` and `heldout.npz` of a deterministic split, with their content digests."""

    train: str
    heldout: str
    train_digest: str
    heldout_digest: str
    counts: dict[str, int]


class PaletteRef(StageRef):
    """A palette folder (palette.npy and its swatch); `palette_digest` is over its centres."""

    palette_digest: str
    clusters: int
    metrics: dict[str, float] = {}


class ShardsRef(StageRef):
    """A folder of webdataset shards of one split; `manifest_digest` is over its manifest."""

    manifest_digest: str
    split: str
    counts: dict[str, int]


class CheckpointRef(StageRef):
    """A training run: its last checkpoint folder, the step it reached and the step it started from
    (non-zero for a warm start), its final metrics and the digests of what it was trained on."""

    checkpoint: str
    step: int
    start_step: int
    metrics: dict[str, float | int]
    palette_digest: str
    shards_digest: str


class ProbeScores(BaseModel):
    """Held-out accuracy of the linear probe and of its two baselines, and the layer probed."""

    model_config = ConfigDict(frozen=True)

    accuracy: float
    random_init: float
    raw_pixels: float
    layer: int


class ProbeRef(StageRef):
    probe: ProbeScores


class SamplesRef(StageRef):
    """PNG grids of unconditional samples and, when there is held-out data, of completions."""

    sample_grid: str
    completion_grid: str | None = None


class WarmStart(BaseModel):
    """Where a retrain starts from: a registered version's checkpoint folder, the version
    (`<name>/<version>`) and the checkpoint's digest (part of the new run's workspace key)."""

    model_config = ConfigDict(frozen=True)

    checkpoint: str
    model: str
    checkpoint_digest: str | None = None


class FinetuneScores(BaseModel):
    """What fine-tuning reached: test accuracy of the kept checkpoint, its validation accuracy and step,
    the step budget, the class count, the objective and whether it started from random weights."""

    model_config = ConfigDict(frozen=True)

    test_accuracy: float
    val_accuracy: float
    best_step: int
    steps: int
    n_classes: int
    objective: str
    from_scratch: bool


class FinetuneRef(StageRef):
    """A fine-tuned classifier: its checkpoint folder (`load_classifier` reads it), its scores, and the
    digests of the pretrained checkpoint (the pretrain stage's) and of the shards it was trained and
    tested on."""

    checkpoint: str
    finetune: FinetuneScores
    pretrain_digest: str
    palette_digest: str
    shards_digest: str
    test_shards_digest: str

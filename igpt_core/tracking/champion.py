"""The registry alias `champion` (MLflow 3 aliases, no stages): which version is in use, moving it, the
decision tags a version carries, and the data a version was judged and trained on.

The flow decides (igpt_core.retrain.promotion_decision); this module only reads and writes MLflow:
- `champion_version` / `set_champion`: the alias;
- `decision_tags`: what a version is tagged with when it is registered (decision, reason, both figures,
  the fixed held-out shards it was judged on, which later challengers are judged on too);
- `training_source`: the images a version was trained on (for the replay of a retrain), from its tags or,
  for a version registered before they existed, through its pretrain run's tokenize-train input;
- `parse_ref`: `igpt/3`, `3`, `igpt@champion`, `models:/igpt@champion` -> (name, version);
- `judge`: scores a new checkpoint and the champion on the champion's fixed held-out shards with the
  caller's scoring function and returns the decision and the tags to register the version with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igpt_core.retrain import Promotion, first_champion, promotion_decision
from igpt_core.tracking.registry import MODEL_NAME, get_version, load_registered
from igpt_core.tracking.runs import TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

CHAMPION = "champion"
"""The alias of the version in use; `models:/igpt@champion` loads it."""
DECISION_TAG = "igpt.champion.decision"
"""first | promoted | kept (see igpt_core.retrain.Promotion)."""
REASON_TAG = "igpt.champion.reason"
METRIC_TAG = "igpt.champion.metric"
SCORE_TAG = "igpt.champion.challenger_score"
"""The version's own figure on the fixed held-out shards."""
CHAMPION_SCORE_TAG = "igpt.champion.champion_score"
"""The champion's figure on the same shards, by the same code, when this version was judged."""
AGAINST_TAG = "igpt.champion.against"
"""`<name>/<version>` of the champion this version was judged against (absent for the first)."""
TOLERANCE_TAG = "igpt.champion.tolerance"
EVAL_SHARDS_TAG = "igpt.eval_shards"
"""Folder of the fixed held-out token shards the version was judged on (later challengers too)."""
EVAL_SHARDS_DIGEST_TAG = "igpt.eval_shards_digest"
"""Their manifest digest."""
EVAL_SPLIT_TAG = "igpt.eval_split"
TRAIN_SOURCE_TAG = "igpt.train_source"
"""The image source (spec) the version's training shards were tokenized from; a retrain replays it."""
TRAIN_SOURCE_DIGEST_TAG = "igpt.train_source_digest"


def champion_version(mlflow: MlflowClient, name: str = MODEL_NAME) -> Any | None:
    """The ModelVersion `name@champion`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    try:
        return mlflow.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def set_champion(mlflow: MlflowClient, name: str, version: str | int) -> None:
    """Points `name@champion` at `version` (an alias names one version: the previous one loses it)."""
    mlflow.set_registered_model_alias(name, CHAMPION, str(version))


def set_version_tags(mlflow: MlflowClient, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Sets tags on model version `name`/`version` (values as strings)."""
    for key, value in tags.items():
        mlflow.set_model_version_tag(name, str(version), key, str(value))


def decision_tags(
    promotion: Promotion, *, against: str | None, eval_shards: str, eval_digest: str, eval_split: str
) -> dict[str, str]:
    """The tags a judged version is registered with: the decision, its reason, both figures and the fixed
    held-out shards they were measured on."""
    tags = {
        DECISION_TAG: promotion.decision,
        REASON_TAG: promotion.reason,
        METRIC_TAG: promotion.metric,
        SCORE_TAG: _figure(promotion.challenger),
        TOLERANCE_TAG: f"{promotion.tolerance:g}",
        EVAL_SHARDS_TAG: eval_shards,
        EVAL_SHARDS_DIGEST_TAG: eval_digest,
        EVAL_SPLIT_TAG: eval_split,
    }
    if math.isfinite(promotion.champion):
        tags[CHAMPION_SCORE_TAG] = _figure(promotion.champion)
    if against:
        tags[AGAINST_TAG] = against
    return tags


def _figure(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else str(value)


def training_source(mlflow: MlflowClient, version: Any) -> tuple[str, str] | None:
    """(spec, digest) of the images `version` (a ModelVersion) was trained on: its `igpt.train_source`
    tags, else the source dataset of the tokenize-train run its pretrain run names as upstream; None when
    neither is recorded."""
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    tags = dict(version.tags)
    if tags.get(TRAIN_SOURCE_TAG):
        return tags[TRAIN_SOURCE_TAG], tags.get(TRAIN_SOURCE_DIGEST_TAG, "")
    try:
        pretrain = mlflow.get_run(version.run_id)
        tokenize = pretrain.data.tags.get("igpt.upstream.tokenize-train")
        if not tokenize:
            return None
        run = mlflow.get_run(tokenize)
    except MlflowException:
        return None
    for item in run.inputs.dataset_inputs if run.inputs is not None else []:
        input_tags = {t.key: t.value for t in item.tags}
        source = json.loads(item.dataset.source) if item.dataset.source else {}
        if input_tags.get("igpt.kind") == "source" and source.get("spec"):
            return str(source["spec"]), input_tags.get("igpt.digest", "")
    return None


def parse_ref(mlflow: MlflowClient, ref: str) -> tuple[str, str]:
    """(name, version) of a model reference: `igpt/3`, `3` (the default model), `igpt@champion` or any
    `name@alias`, each also with `models:/` in front. TrackingError names the ref when it resolves to
    nothing."""
    text = ref.strip().removeprefix("models:/")
    if "@" in text:
        name, _, alias = text.partition("@")
        name = name or MODEL_NAME
        from mlflow.exceptions import MlflowException  # heavy: mlflow

        try:
            version = mlflow.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise TrackingError(f"{ref}: model {name!r} has no version with alias {alias!r}") from None
        return name, str(version.version)
    name, _, number = text.rpartition("/")
    if not number.isdigit():
        raise TrackingError(f"{ref}: not a model version (igpt/3, 3, igpt@champion)")
    get_version(mlflow, name or MODEL_NAME, number)
    return name or MODEL_NAME, number


@dataclass(frozen=True)
class EvalShards:
    """Token shards a version is judged on: folder, manifest digest, split."""

    dir: str
    digest: str
    split: str


@dataclass(frozen=True)
class Judgement:
    """A new version's decision, the tags to register it with, and the champion it was judged against."""

    promotion: Promotion
    tags: dict[str, str] = field(default_factory=dict)
    against: str | None = None
    """`<name>/<version>` of the champion (None for the first version)."""


Scorer = Callable[[str, str, str], float]
"""score(checkpoint folder, shards folder, split) -> the figure compared (same code for both models)."""


def judge(
    mlflow: MlflowClient,
    name: str,
    checkpoint_dir: str,
    *,
    palette_digest: str,
    own_eval: EvalShards | None,
    score: Scorer,
    metric: str,
    tolerance: float,
    higher_is_better: bool,
    download_to: str | Path,
) -> Judgement:
    """Judges a checkpoint about to be registered as a version of `name` against `name@champion`.

    No champion: it is the first (its figure on `own_eval`, which become the fixed shards). Otherwise
    both are scored by `score` on the shards the champion was judged on (`igpt.eval_shards`; a champion
    registered before those tags is scored on `own_eval`, so both still see the same data); a different
    palette makes the figures incomparable, so the version is kept out and the reason says so.
    """
    champ = champion_version(mlflow, name)
    if champ is None:
        figure = score(checkpoint_dir, own_eval.dir, own_eval.split) if own_eval else math.nan
        promotion = first_champion(metric, figure)
        shards = own_eval or EvalShards("", "", "")
        return Judgement(promotion, decision_tags(promotion, against=None, **_shard_tags(shards)))
    tags = dict(champ.tags)
    against = f"{name}/{champ.version}"
    recorded: EvalShards | None = (
        EvalShards(tags[EVAL_SHARDS_TAG], tags.get(EVAL_SHARDS_DIGEST_TAG, ""), tags.get(EVAL_SPLIT_TAG, ""))
        if tags.get(EVAL_SHARDS_TAG)
        else own_eval
    )
    if recorded is None or not recorded.dir:
        raise TrackingError(f"champion {against}: no held-out shards recorded and none given to judge on")
    shards = recorded
    if not Path(shards.dir).is_dir():
        raise TrackingError(
            f"champion {against}: its held-out shards {shards.dir} ({EVAL_SHARDS_TAG}) are not on this "
            "machine; challenger and champion must be scored on the same data"
        )
    if tags.get("igpt.palette_digest") and tags["igpt.palette_digest"] != palette_digest:
        promotion = Promotion(
            "kept",
            f"palette {palette_digest[:12]} differs from the champion's {tags['igpt.palette_digest'][:12]}: "
            f"{metric} does not compare across palettes; set the alias by hand if it should serve",
            metric,
            math.nan,
            math.nan,
            tolerance,
        )
        return Judgement(promotion, decision_tags(promotion, against=against, **_shard_tags(shards)), against)
    champion_dir = load_registered(
        name,
        champ.version,
        dst=Path(download_to) / f"{name}-v{champ.version}",
        tracking_uri=mlflow.tracking_uri,
    )
    split = shards.split or "test"
    promotion = promotion_decision(
        score(checkpoint_dir, shards.dir, split),
        score(str(champion_dir), shards.dir, split),
        tolerance=tolerance,
        metric=metric,
        higher_is_better=higher_is_better,
    )
    return Judgement(promotion, decision_tags(promotion, against=against, **_shard_tags(shards)), against)


def _shard_tags(shards: EvalShards) -> dict[str, str]:
    return {"eval_shards": shards.dir, "eval_digest": shards.digest, "eval_split": shards.split}

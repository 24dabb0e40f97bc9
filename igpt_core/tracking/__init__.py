"""MLflow records of the pipeline: runs, datasets with the project's digests, artifacts, registry, lineage.

This package is the only part of igpt_core that imports MLflow (and only inside functions, so importing
it is cheap). `runs` keeps the run bookkeeping (client, experiment, runs, params, metrics, artifacts,
datasets, curves), `registry` the model versions, `provenance` the lineage walk from a model back to
its inputs, `champion` the alias `champion` and the decision tags; every public name is importable from
here (`from igpt_core import tracking; tracking.start_run(...)`).
`pyfunc` (imported by `register_model` when it runs, and by MLflow when it loads a model) makes each
registered version an MLflow Model; `pyfunc_model` is its model-from-code file, run only by MLflow.

Tags written here (read back by `lineage`):
- every run: `igpt.stage` (pipeline, palette, tokenize-train, tokenize-heldout, pretrain, probe, samples,
  finetune, ...), `igpt.code_version`; stage runs also `igpt.digest` (the content digest of their output
  folder);
- `igpt.upstream.<stage>` = run id of an upstream stage run this run consumed;
  `igpt.upstream.model` = `<name>/<version>` of the model whose weights a run started from (a warm-started
  pretrain continued it; a finetune run fine-tuned it);
- model versions: `igpt.palette_digest`, `igpt.shards_digest`, `igpt.code_version`, `igpt.parent_run`;
  `igpt-classifier` versions also `igpt.pretrained_model` (`igpt/<version>`), `igpt.pretrain_run`,
  `igpt.pretrained_checkpoint_digest`, `igpt.test_shards_digest` and their accuracies;
- judged versions (`champion`): `igpt.champion.decision` (first | promoted | kept), `.reason`, `.metric`,
  `.challenger_score`, `.champion_score`, `.against`, `.tolerance`, and the fixed held-out shards
  `igpt.eval_shards` / `igpt.eval_shards_digest` / `igpt.eval_split`; `igpt` versions also
  `igpt.train_source` / `igpt.train_source_digest` (the images a retrain replays).
"""

from __future__ import annotations

from igpt_core.tracking.champion import (
    CHAMPION,
    DECISION_TAG,
    TRAIN_SOURCE_DIGEST_TAG,
    TRAIN_SOURCE_TAG,
    EvalShards,
    Judgement,
    champion_version,
    decision_tags,
    judge,
    parse_ref,
    set_champion,
    set_version_tags,
    training_source,
)
from igpt_core.tracking.provenance import format_lineage, lineage
from igpt_core.tracking.registry import (
    CHECKPOINT_ARTIFACT,
    CLASSIFIER_NAME,
    MODEL_ARTIFACT,
    MODEL_NAME,
    all_versions,
    get_version,
    latest_version,
    load_registered,
    register_model,
    version_for_run,
)
from igpt_core.tracking.runs import (
    EXPERIMENT,
    TrackingError,
    client,
    code_version,
    default_tracking_uri,
    end_run,
    ensure_experiment,
    log_artifact,
    log_dataset,
    log_history,
    log_metrics,
    log_params,
    save_curve_png,
    set_tags,
    start_run,
    system_metrics,
)

__all__ = [
    "CHAMPION",
    "CHECKPOINT_ARTIFACT",
    "CLASSIFIER_NAME",
    "DECISION_TAG",
    "EXPERIMENT",
    "EvalShards",
    "Judgement",
    "MODEL_ARTIFACT",
    "MODEL_NAME",
    "TRAIN_SOURCE_DIGEST_TAG",
    "TRAIN_SOURCE_TAG",
    "TrackingError",
    "all_versions",
    "champion_version",
    "client",
    "code_version",
    "decision_tags",
    "default_tracking_uri",
    "end_run",
    "ensure_experiment",
    "format_lineage",
    "get_version",
    "judge",
    "latest_version",
    "lineage",
    "load_registered",
    "log_artifact",
    "log_dataset",
    "log_history",
    "log_metrics",
    "log_params",
    "parse_ref",
    "register_model",
    "save_curve_png",
    "set_champion",
    "set_tags",
    "set_version_tags",
    "start_run",
    "system_metrics",
    "training_source",
    "version_for_run",
]

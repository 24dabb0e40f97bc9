"""Provenance (`lineage`): from a model version or run back to the data, palette, shards and code.

It follows the tags `igpt.upstream.<stage>` (run ids), `igpt.upstream.model` (`<name>/<version>`) and the
runs' dataset inputs, written by `runs` and `registry` (see the package docstring for the tags).
"""

from __future__ import annotations

import json
from typing import Any

from igpt_core.tracking.champion import parse_ref
from igpt_core.tracking.registry import get_version
from igpt_core.tracking.runs import TrackingError, client

MODEL_LINK = "igpt.upstream.model"
"""The run tag naming the model version (`<name>/<version>`) whose weights the run started from."""


def _run_record(run: Any, depth: int, via: str) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "kind": "run",
        "depth": depth,
        "via": via,
        "run_id": run.info.run_id,
        "stage": tags.get("igpt.stage", run.info.run_name),
        "status": run.info.status,
        "digest": tags.get("igpt.digest"),
        "code_version": tags.get("igpt.code_version"),
        "parent_run": tags.get("mlflow.parentRunId"),
    }


def lineage(ref: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Walks back from `ref` to everything it was made from, in depth-first order.

    `ref` is a model version (`igpt/3`, `models:/igpt/3`, or `3` for the default model name), an alias
    (`igpt@champion`, `models:/igpt@champion`) or a run id.
    Records have `kind` model | run | dataset | code, a `depth` and a `via` (the link that led there):
    model version -> the run that logged it -> upstream stage runs (tags `igpt.upstream.*`) -> their
    datasets (source, palette, shard and checkpoint digests) -> the code version, and, for a warm-started
    model or a fine-tuned classifier, on to the model version it started from (walked before the
    upstream runs, so a classifier's lineage passes through its pretrained version).
    """
    mlflow = client(tracking_uri)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    ref = ref.strip()
    if ref.startswith("models:/") or "/" in ref or "@" in ref or ref.isdigit():
        name, version = parse_ref(mlflow, ref)
        _walk_model(mlflow, name, version, 0, "ref", records, seen)
    else:
        _walk_run(mlflow, ref, 0, "ref", records, seen)
    return records


def _walk_model(mlflow: Any, name: str, version: str, depth: int, via: str, out: list, seen: set) -> None:
    key = f"model:{name}/{version}"
    if key in seen:
        return
    seen.add(key)
    mv = get_version(mlflow, name, version)
    out.append(
        {
            "kind": "model",
            "depth": depth,
            "via": via,
            "name": name,
            "version": str(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
            "tags": dict(mv.tags),
        }
    )
    if mv.run_id:
        _walk_run(mlflow, mv.run_id, depth + 1, "logged by", out, seen)


def _walk_run(mlflow: Any, run_id: str, depth: int, via: str, out: list, seen: set) -> None:
    from mlflow.exceptions import MlflowException  # heavy: mlflow

    if f"run:{run_id}" in seen:
        return
    seen.add(f"run:{run_id}")
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id}: not found in {mlflow.tracking_uri}") from None
    out.append(_run_record(run, depth, via))
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        source = json.loads(item.dataset.source) if item.dataset.source else {}
        out.append(
            {
                "kind": "dataset",
                "depth": depth + 1,
                "via": tags.get("mlflow.data.context", "input"),
                "name": item.dataset.name,
                "dataset_kind": tags.get("igpt.kind", source.get("kind")),
                "digest": tags.get("igpt.digest", item.dataset.digest),
                "spec": source.get("spec"),
            }
        )
    if run.data.tags.get("igpt.code_version"):
        out.append(
            {"kind": "code", "depth": depth + 1, "via": "code", "version": run.data.tags["igpt.code_version"]}
        )
    tags = run.data.tags
    model = tags.get(MODEL_LINK, "")
    if "/" in model:
        # The model first: a fine-tuned run names both its pretrained version and that version's pretrain
        # run, and the walk should pass through the version (it is what was registered and tagged).
        name, _, version = model.rpartition("/")
        via = "fine-tuned from" if tags.get("igpt.stage") == "finetune" else "warm start from"
        _walk_model(mlflow, name, version, depth + 1, via, out, seen)
    for key, value in sorted(tags.items()):
        if key.startswith("igpt.upstream.") and key != MODEL_LINK:
            _walk_run(mlflow, value, depth + 1, key[len("igpt.upstream.") :], out, seen)


def format_lineage(records: list[dict[str, Any]]) -> str:
    """The lineage records as an indented tree, one line each (what `igpt lineage` prints)."""
    lines = []
    for rec in records:
        pad = "  " * rec["depth"]
        via = f"[{rec['via']}] " if rec["depth"] else ""
        if rec["kind"] == "model":
            tags = rec["tags"]
            extra = ", ".join(
                f"{k.removeprefix('igpt.')}={v[:16]}"
                for k, v in sorted(tags.items())
                if k.startswith("igpt.")
            )
            lines.append(f"{pad}{via}model {rec['name']} v{rec['version']} (run {rec['run_id']}; {extra})")
        elif rec["kind"] == "run":
            digest = f" digest={rec['digest'][:16]}" if rec.get("digest") else ""
            lines.append(f"{pad}{via}run {rec['run_id']} stage={rec['stage']} {rec['status']}{digest}")
        elif rec["kind"] == "dataset":
            lines.append(
                f"{pad}{via}dataset {rec['name']} ({rec['dataset_kind']}) digest={str(rec['digest'])[:16]}"
                + (f" spec={rec['spec']}" if rec.get("spec") and rec["spec"] != rec["name"] else "")
            )
        else:
            lines.append(f"{pad}{via}code {rec['version']}")
    return "\n".join(lines)

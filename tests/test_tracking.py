"""igpt_core.tracking against a real MLflow SQLite store: datasets with our digests, the registry, the
lineage walk and its text, the loss-curve PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from igpt_core import tracking

SOURCE_DIGEST = "a" * 64
PALETTE_DIGEST = "b" * 64
SHARDS_DIGEST = "c" * 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a small pipeline's worth of runs: parent, palette, tokenize, pretrain; model v1."""
    root = tmp_path_factory.mktemp("tracking")
    uri = "sqlite:///" + str(root / "mlflow.db")
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "igpt", root / "artifacts")
    assert tracking.ensure_experiment(client, "igpt", root / "artifacts") == experiment
    parent = tracking.start_run(
        client, experiment, "pipeline", params={"clusters": 8, "nested": {"a": [1, 2]}}
    )
    palette = tracking.start_run(
        client, experiment, "palette", parent_run_id=parent, tags={"igpt.digest": "p1"}
    )
    tracking.log_dataset(
        client, palette, name="builtin:digits", digest=SOURCE_DIGEST, context="train", kind="source"
    )
    tracking.end_run(client, palette)
    tokenize = tracking.start_run(
        client, experiment, "tokenize-train", parent_run_id=parent, tags={"igpt.upstream.palette": palette}
    )
    tracking.log_dataset(
        client, tokenize, name="builtin:digits", digest=SOURCE_DIGEST, context="train", kind="source"
    )
    tracking.log_dataset(
        client,
        tokenize,
        name="palette-b",
        digest=PALETTE_DIGEST,
        context="palette",
        kind="palette",
        spec="/ws/p",
    )
    tracking.end_run(client, tokenize)
    pretrain = tracking.start_run(
        client,
        experiment,
        "pretrain",
        parent_run_id=parent,
        tags={"igpt.upstream.palette": palette, "igpt.upstream.tokenize-train": tokenize},
    )
    tracking.log_dataset(
        client, pretrain, name="shards-c", digest=SHARDS_DIGEST, context="train", kind="shards"
    )
    tracking.log_history(client, pretrain, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
    checkpoint = root / "ckpt"
    checkpoint.mkdir()
    np.save(checkpoint / "palette.npy", np.zeros((8, 3), np.float32), allow_pickle=False)
    (checkpoint / "config.json").write_text('{"n_layer": 1}')
    version = tracking.register_model(
        client, pretrain, tags={"igpt.palette_digest": PALETTE_DIGEST}, checkpoint_dir=checkpoint
    )
    tracking.end_run(client, pretrain)
    tracking.end_run(client, parent)
    return {
        "uri": uri,
        "client": client,
        "parent": parent,
        "palette": palette,
        "tokenize": tokenize,
        "pretrain": pretrain,
        "version": version,
        "checkpoint": checkpoint,
        "root": root,
    }


def test_datasets_carry_our_digest(store):
    run = store["client"].get_run(store["pretrain"])
    (item,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in item.tags}
    assert item.dataset.digest == SHARDS_DIGEST[:32]  # MLflow's column holds 36 characters
    assert tags["igpt.digest"] == SHARDS_DIGEST
    assert tags["igpt.kind"] == "shards"
    assert tags["mlflow.data.context"] == "train"
    assert item.dataset.source_type == "igpt"


def test_runs_are_nested_and_params_are_strings(store):
    client = store["client"]
    assert client.get_run(store["palette"]).data.tags["mlflow.parentRunId"] == store["parent"]
    params = client.get_run(store["parent"]).data.params
    assert params == {"clusters": "8", "nested": '{"a": [1, 2]}'}
    history = client.get_metric_history(store["pretrain"], "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5)]


def test_registry_round_trip(store, tmp_path):
    client = store["client"]
    assert store["version"] == "1"
    assert tracking.version_for_run(client, "igpt", store["pretrain"]) == "1"
    assert tracking.version_for_run(client, "igpt", store["palette"]) is None
    assert [str(v.version) for v in tracking.all_versions(client, "igpt")] == ["1"]
    before = os.environ.get("MLFLOW_TRACKING_URI")
    folder = tracking.load_registered("igpt", None, dst=tmp_path / "dl", tracking_uri=store["uri"])
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # no process-wide side effect
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "palette.npy"]
    assert (folder / "config.json").read_text() == (store["checkpoint"] / "config.json").read_text()
    with pytest.raises(tracking.TrackingError, match="version 7: not found"):
        tracking.load_registered("igpt", 7, tracking_uri=store["uri"])
    with pytest.raises(tracking.TrackingError, match="no registered version"):
        tracking.load_registered("nothing-here", tracking_uri=store["uri"])


def test_lineage_walks_model_to_runs_datasets_and_code(store):
    records = tracking.lineage("igpt/1", tracking_uri=store["uri"])
    assert tracking.lineage("models:/igpt/1", tracking_uri=store["uri"]) == records
    assert tracking.lineage("1", tracking_uri=store["uri"]) == records
    assert records[0] == {
        **records[0],
        "kind": "model",
        "version": "1",
        "run_id": store["pretrain"],
        "depth": 0,
    }
    runs = [(r["stage"], r["depth"], r["via"]) for r in records if r["kind"] == "run"]
    # each run appears once, though palette is reached both directly and through tokenize
    assert runs == [
        ("pretrain", 1, "logged by"),
        ("palette", 2, "palette"),
        ("tokenize-train", 2, "tokenize-train"),
    ]
    digests = {(r["dataset_kind"], r["digest"]) for r in records if r["kind"] == "dataset"}
    assert digests == {("source", SOURCE_DIGEST), ("palette", PALETTE_DIGEST), ("shards", SHARDS_DIGEST)}
    code = {r["version"] for r in records if r["kind"] == "code"}
    assert code == {tracking.code_version()}
    text = tracking.format_lineage(records)
    lines = text.splitlines()
    assert lines[0].startswith("model igpt v1 (run ")
    assert any(line.startswith("    [palette] run ") for line in lines)
    assert f"digest={PALETTE_DIGEST[:16]}" in text


def test_lineage_of_unknown_refs_is_a_clear_error(store):
    with pytest.raises(tracking.TrackingError, match="run 0123abc: not found"):
        tracking.lineage("0123abc", tracking_uri=store["uri"])
    with pytest.raises(tracking.TrackingError, match="version 9: not found"):
        tracking.lineage("igpt/9", tracking_uri=store["uri"])


def test_failed_run_keeps_its_cause(store):
    client = store["client"]
    experiment = client.get_experiment_by_name("igpt").experiment_id
    run = tracking.start_run(client, experiment, "probe")
    tracking.end_run(client, run, failed=True, error="ValueError: no labels")
    record = client.get_run(run)
    assert record.info.status == "FAILED"
    assert record.data.tags["igpt.error"] == "ValueError: no labels"


def test_loss_curve_png(tmp_path):
    from PIL import Image

    history = [{"step": s, "loss": 4.0 / s, "eval_loss": 4.5 / s, "lr": 0.1} for s in range(1, 11)]
    path = tracking.save_curve_png(history, tmp_path / "loss.png", size=(320, 200))
    with Image.open(path) as image:
        assert image.size == (320, 200)
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels != 255).any(axis=-1).sum() > 500  # axes, two curves and labels were drawn
    assert tracking.save_curve_png([{"step": 1, "lr": 0.1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_code_version_names_a_commit_or_the_package():
    version = tracking.code_version()
    assert version.startswith("git:") or version.startswith("igpt==")
    if version.startswith("git:"):
        assert len(version.removeprefix("git:").removesuffix("+dirty")) == 40


def test_default_tracking_uri_is_sqlite_in_the_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri(tmp_path) == "sqlite:///" + str(
        Path(tmp_path).resolve() / "mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:1"


def test_classifier_lineage_walks_through_its_pretrained_version(store):
    """A finetune run names the registered version it started from (`igpt.upstream.model`) and that
    version's pretrain run; the classifier's lineage reaches the data through the version."""
    client = store["client"]
    experiment = client.get_experiment_by_name("igpt").experiment_id
    run = tracking.start_run(
        client,
        experiment,
        "finetune",
        parent_run_id=store["parent"],
        tags={"igpt.upstream.pretrain": store["pretrain"], "igpt.upstream.model": "igpt/1"},
    )
    tracking.log_dataset(client, run, name="shards-c", digest=SHARDS_DIGEST, context="train", kind="shards")
    version = tracking.register_model(
        client,
        run,
        name=tracking.CLASSIFIER_NAME,
        tags={"igpt.pretrained_model": "igpt/1"},
        checkpoint_dir=store["checkpoint"],
    )
    tracking.end_run(client, run)
    assert (tracking.CLASSIFIER_NAME, version) == ("igpt-classifier", "1")
    assert "fine-tuned" in client.get_registered_model("igpt-classifier").description
    assert tracking.version_for_run(client, "igpt", run) is None  # its own model, not a version of igpt

    records = tracking.lineage("igpt-classifier/1", tracking_uri=store["uri"])
    trail = [(r["kind"], r.get("name") or r.get("stage"), r["depth"], r["via"]) for r in records]
    assert [t for t in trail if t[0] in ("model", "run")] == [
        ("model", "igpt-classifier", 0, "ref"),
        ("run", "finetune", 1, "logged by"),
        ("model", "igpt", 2, "fine-tuned from"),
        ("run", "pretrain", 3, "logged by"),
        ("run", "palette", 4, "palette"),
        ("run", "tokenize-train", 4, "tokenize-train"),
    ]
    digests = {r["digest"] for r in records if r["kind"] == "dataset"}
    assert {SOURCE_DIGEST, PALETTE_DIGEST, SHARDS_DIGEST} <= digests
    assert "  [fine-tuned from] model igpt v1" in tracking.format_lineage(records)

"""The `igpt` flow in process: Prefect's test server, the session's local Ray, MLflow on SQLite.

One workspace for the module; the tests run in order and build on each other (first run, rerun, changed
held-out data with an injected failure and a resume, lineage, retraining). Sizes are tiny (8x8 digits,
8 colours, a few steps): what is checked is orchestration, not learning.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

STAGES = ["palette", "tokenize-train", "tokenize-heldout", "pretrain", "probe", "samples", "finetune"]


def test_add_data_publishes_whole_batches_once(tmp_path, monkeypatch):
    from flows.retrain import add_data
    from igpt_core.retrain import list_batches

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    folder = tmp_path / "new" / "3"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not checked here")
    loose = tmp_path / "b.png"
    loose.write_bytes(b"png bytes")
    watch = tmp_path / "incoming"
    added = add_data([tmp_path / "new", loose], watch)
    assert added["event_id"] is None  # no Prefect API configured: nothing to send the event to
    assert sorted(added["batches"]) == sorted(p.name for p in list_batches(watch))
    assert len(added["batches"]) == 2
    assert (watch / added["batches"][0] / "3" / "a.png").read_bytes() == b"not checked here"
    assert not [p for p in watch.iterdir() if p.name.startswith(".")]  # no partial copies left
    again = add_data([tmp_path / "new", loose], watch)
    assert again["batches"] == added["batches"] and len(list_batches(watch)) == 2
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        add_data([tmp_path / "missing"], watch)


def test_pipeline_params_defaults_are_the_demo_preset():
    """PipelineParams writes no stage default of its own: they are igpt_core.config's `demo` preset."""
    from flows.pipeline import PipelineParams
    from igpt_core.config import DEMO, TrainConfig, field_docs
    from igpt_core.finetune import FinetuneConfig

    params = PipelineParams()
    described = PipelineParams.model_fields
    assert (params.clusters, params.resolution, params.preset) == (16, 16, "tiny")
    assert params.clusters == DEMO.palette.clusters == DEMO.model.vocab_size
    assert params.resolution == DEMO.tokenize.resolution == DEMO.palette.resolution == DEMO.model.resolution
    assert params.build_model_config(params.clusters) == DEMO.model
    assert (params.steps, params.batch_size, params.lr, params.workers, params.compile, params.seed) == (
        DEMO.train.steps,
        DEMO.train.batch_size,
        DEMO.train.lr,
        DEMO.train.workers,
        DEMO.train.compile,
        DEMO.train.seed,
    )
    assert params.probe_limit == DEMO.probe.max_train == DEMO.probe.max_test == 1000
    assert params.finetune is None  # on when the data is labelled
    assert params.classifier_name == "igpt-classifier"
    tuned = params.build_finetune_config()
    assert tuned == DEMO.finetune  # the demo's budget, its warmup and evaluation interval unchanged
    assert (tuned.steps, tuned.max_train, tuned.max_test) == (60, 500, 500)
    short = PipelineParams(finetune_steps=4, finetune_limit=None, finetune_objective="clf", workers=2)
    tuned = short.build_finetune_config()
    assert (tuned.steps, tuned.warmup_steps, tuned.eval_every) == (4, 1, 1)
    assert (tuned.max_train, tuned.max_test, tuned.objective, tuned.workers) == (None, None, "clf", 2)
    assert described["finetune_steps"].description == field_docs(FinetuneConfig)["steps"]
    train = params.build_train_config()
    assert (train.steps, train.warmup_steps, train.eval_every, train.checkpoint_every) == (200, 20, 66, 100)
    assert described["steps"].description == field_docs(TrainConfig)["steps"]
    assert described["refit"].description  # pipeline-only fields keep their own docstrings


def test_summary_reports_the_classifier():
    from flows.params import PipelineSummary

    summary = PipelineSummary(None, "p" * 32, "sqlite:///x.db", "/ws", "full")
    assert "fine-tuned" not in str(summary)
    summary.finetune = {
        "test_accuracy": 0.875,
        "val_accuracy": 0.9,
        "best_step": 40,
        "steps": 60,
        "objective": "joint",
    }
    summary.classifier_name, summary.classifier_version = "igpt-classifier", "3"
    text = str(summary)
    assert "fine-tuned:     test accuracy 0.875 (validation 0.900 at step 40 of 60, joint)" in text
    assert "classifier:     igpt-classifier version 3 (models:/igpt-classifier/3)" in text


def test_flows_modules_import_each_other_without_a_cycle():
    """flows/ imports form a DAG (pipeline -> retrain -> finish -> stages -> runner, never back)."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "flows"
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flows"):
                names.update(
                    [node.module.split(".")[1]]
                    if "." in node.module
                    else [alias.name for alias in node.names]
                )
        graph[path.stem] = names - {path.stem}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*trail, name))
            done.add(name)

    for name in graph:
        visit(name, ())
    assert "pipeline" not in graph["retrain"]


@pytest.fixture(scope="module")
def harness(ray_local):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Real images (scikit-learn's digits) as .npz sources: train, held-out, a changed held-out, new data."""
    from sklearn.datasets import load_digits

    from igpt_core.split import write_npz

    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    folder = tmp_path_factory.mktemp("data")
    parts = {
        "train": slice(0, 240),
        "heldout": slice(240, 320),
        "heldout2": slice(240, 300),
        "new": slice(400, 480),
    }
    return {
        name: write_npz(folder / f"{name}.npz", images[part], labels[part]) for name, part in parts.items()
    }


def params(workspace: Path, data: dict[str, Path], heldout: str = "heldout", **overrides):
    from flows.pipeline import PipelineParams

    base = dict(
        source=str(data["train"]),
        heldout=str(data[heldout]),
        workspace=str(workspace),
        clusters=8,
        resolution=8,
        steps=6,
        batch_size=8,
        samples=2,
        probe_limit=40,
        retrain_steps=4,
        finetune_steps=4,
        finetune_batch_size=8,
    )
    return PipelineParams(**{**base, **overrides})


@pytest.fixture(scope="module")
def first(harness, data, tmp_path_factory):
    from flows.pipeline import run_pipeline

    workspace = tmp_path_factory.mktemp("igpt-home")
    return workspace, run_pipeline(params(workspace, data))


def mlflow_client(workspace: Path):
    from igpt_core import tracking

    return tracking.client(tracking.default_tracking_uri(workspace))


def runs_of_stage(client, stage: str) -> list:
    experiment = client.get_experiment_by_name("igpt")
    return client.search_runs([experiment.experiment_id], f"tags.`igpt.stage` = '{stage}'")


@pytest.mark.slow
def test_first_run_records_every_stage(first):
    from igpt_core import tracking
    from igpt_core.checkpoint import load_classifier
    from igpt_core.sample import sample_images
    from igpt_core.shards import read_meta

    workspace, summary = first
    assert list(summary.stages) == STAGES
    assert not summary.reused()
    assert summary.model_version == "1"
    assert 0.0 <= summary.probe["accuracy"] <= 1.0
    assert Path(summary.sample_grid).is_file() and Path(summary.completion_grid).is_file()
    for ref in summary.stages.values():
        assert Path(ref["dir"]).parent.parent == workspace  # <workspace>/<kind>/<digest>
        assert Path(ref["dir"]).name == ref["digest"]

    client = mlflow_client(workspace)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["prefect.flow_run_id"] == summary.flow_run_id
    assert parent.data.params["clusters"] == "8"
    assert parent.info.status == "FINISHED"
    pretrain = client.get_run(summary.stages["pretrain"]["run_id"])
    assert pretrain.data.tags["mlflow.parentRunId"] == summary.parent_run_id
    assert pretrain.data.tags["igpt.upstream.palette"] == summary.stages["palette"]["run_id"]
    assert pretrain.data.tags["igpt.upstream.tokenize-train"] == summary.stages["tokenize-train"]["run_id"]
    manifest = summary.stages["tokenize-train"]["manifest_digest"]
    inputs = {i.dataset.name: i for i in pretrain.inputs.dataset_inputs}
    shards_input = next(i for i in inputs.values() if i.dataset.digest == manifest[:32])
    assert {t.key: t.value for t in shards_input.tags}["igpt.digest"] == manifest
    assert "loss" in pretrain.data.metrics
    # MLflow system metrics of the pretraining machine (GPU ones too where pynvml finds one)
    system = {key for key in pretrain.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert [a.path for a in client.list_artifacts(pretrain.info.run_id, "checkpoint")] == [
        f"checkpoint/{name}"
        for name in ("config.json", "model.safetensors", "palette.npy", "trainer_state.pt")
    ]
    assert read_meta(summary.stages["tokenize-train"]["dir"])["splits"]["train"]["counts"]["written"] == 240

    version = client.get_model_version("igpt", "1")
    assert version.tags["igpt.palette_digest"] == summary.stages["palette"]["palette_digest"]
    assert version.tags["igpt.shards_digest"] == manifest
    assert version.tags["igpt.parent_run"] == summary.parent_run_id
    assert version.tags["igpt.code_version"].startswith(("git:", "igpt=="))
    folder = tracking.load_registered("igpt", "1", tracking_uri=summary.tracking_uri)
    assert sample_images(folder, 1).shape == (1, 8, 8, 3)

    # finetune: its own nested run, curves, artifacts, inputs, and the classifier registered with lineage
    tuned = summary.stages["finetune"]
    assert summary.finetune == tuned["finetune"] and summary.finetune["steps"] == 4
    assert summary.finetune["n_classes"] == 10 and summary.finetune["objective"] == "joint"
    assert 0.0 <= summary.finetune["test_accuracy"] <= 1.0
    assert (summary.classifier_name, summary.classifier_version) == ("igpt-classifier", "1")
    run = client.get_run(tuned["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
    assert run.data.tags["igpt.upstream.pretrain"] == pretrain.info.run_id
    assert run.data.tags["igpt.upstream.model"] == "igpt/1"
    assert run.data.params["finetune.steps"] == "4" and run.data.params["finetune.objective"] == "joint"
    for name in ("loss", "loss_clf", "loss_gen", "val_accuracy"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps and steps == sorted(steps), name
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    assert run.data.metrics["test_accuracy"] == summary.finetune["test_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"finetune.json", "finetune.md", "loss.png", "checkpoint"} <= artifacts
    assert "| " in Path(tuned["dir"], "finetune.md").read_text()
    inputs = {
        {t.key: t.value for t in i.tags}["igpt.digest"]: {t.key: t.value for t in i.tags}[
            "mlflow.data.context"
        ]
        for i in run.inputs.dataset_inputs
    }
    assert inputs == {
        summary.stages["pretrain"]["digest"]: "model",
        manifest: "train",
        summary.stages["tokenize-heldout"]["manifest_digest"]: "test",
    }
    classifier = client.get_model_version("igpt-classifier", "1")
    assert classifier.run_id == run.info.run_id
    assert classifier.tags["igpt.pretrained_model"] == "igpt/1"
    assert classifier.tags["igpt.pretrain_run"] == pretrain.info.run_id
    assert classifier.tags["igpt.pretrained_checkpoint_digest"] == summary.stages["pretrain"]["digest"]
    assert classifier.tags["igpt.palette_digest"] == summary.stages["palette"]["palette_digest"]
    assert classifier.tags["igpt.shards_digest"] == manifest
    assert classifier.tags["igpt.parent_run"] == summary.parent_run_id
    assert float(classifier.tags["igpt.test_accuracy"]) == summary.finetune["test_accuracy"]
    assert parent.data.tags["igpt.classifier_version"] == "igpt-classifier/1"
    model, palette, _ = load_classifier(
        tracking.load_registered("igpt-classifier", "1", tracking_uri=summary.tracking_uri)
    )
    assert model.n_classes == 10 and palette is not None


@pytest.mark.slow
def test_rerun_with_the_same_inputs_skips_everything(first, data):
    from flows.pipeline import run_pipeline

    workspace, before = first
    again = run_pipeline(params(workspace, data))
    assert again.reused() == STAGES
    assert {k: v["run_id"] for k, v in again.stages.items()} == {
        k: v["run_id"] for k, v in before.stages.items()
    }
    assert again.model_version == "1" and again.classifier_version == "1"
    assert again.finetune == before.finetune
    assert len(runs_of_stage(mlflow_client(workspace), "pretrain")) == 1
    assert len(runs_of_stage(mlflow_client(workspace), "finetune")) == 1


@pytest.mark.slow
def test_changed_heldout_fails_in_probe_then_resumes_only_its_dependents(first, data):
    from flows.pipeline import run_pipeline
    from flows.stages import StageFailed

    workspace, before = first
    probes = workspace / "probes"
    shutil.move(probes, workspace / "probes.bak")
    probes.write_text("not a folder: the probe stage cannot write its output")
    try:
        with pytest.raises(StageFailed, match=r"stage probe failed: .*Error"):
            run_pipeline(params(workspace, data, heldout="heldout2"))
    finally:
        probes.unlink()
        shutil.move(workspace / "probes.bak", probes)

    client = mlflow_client(workspace)
    failed = [r for r in runs_of_stage(client, "probe") if r.info.status == "FAILED"]
    assert len(failed) == 3  # the first try and Prefect's two retries on an I/O error
    assert (
        "NotADirectoryError" in failed[0].data.tags["igpt.error"]
        or "FileExistsError" in failed[0].data.tags["igpt.error"]
    )
    heldout_runs = runs_of_stage(client, "tokenize-heldout")
    assert len(heldout_runs) == 2 and all(r.info.status == "FINISHED" for r in heldout_runs)

    resumed = run_pipeline(params(workspace, data, heldout="heldout2"))
    assert resumed.reused() == ["palette", "tokenize-train", "tokenize-heldout", "pretrain"]
    assert resumed.stages["tokenize-heldout"]["run_id"] != before.stages["tokenize-heldout"]["run_id"]
    assert resumed.stages["pretrain"]["run_id"] == before.stages["pretrain"]["run_id"]
    assert resumed.stages["probe"]["dir"] != before.stages["probe"]["dir"]
    assert resumed.model_version == "1"
    # new test shards: a new classifier (tested on them), from the same pretrained version
    assert resumed.stages["finetune"]["dir"] != before.stages["finetune"]["dir"]
    assert resumed.classifier_version == "2"
    version = client.get_model_version("igpt-classifier", "2")
    assert version.tags["igpt.pretrained_model"] == "igpt/1"
    # a challenger classifier: judged on the champion classifier's test shards (v1's), by accuracy
    assert version.tags["igpt.champion.against"] == "igpt-classifier/1"
    assert version.tags["igpt.eval_shards"] == before.stages["tokenize-heldout"]["dir"]
    assert {"igpt.champion.challenger_score", "igpt.champion.champion_score"} <= set(version.tags)
    assert resumed.classifier_champion["decision"] in ("promoted", "kept")
    champion = client.get_model_version_by_alias("igpt-classifier", "champion")
    assert str(champion.version) == ("2" if resumed.classifier_champion["decision"] == "promoted" else "1")
    assert version.tags["igpt.test_shards_digest"] == resumed.stages["tokenize-heldout"]["manifest_digest"]


@pytest.mark.slow
def test_lineage_walks_from_model_version_to_source_data_and_code(first, data):
    from igpt_core import tracking
    from igpt_core.sources import open_source

    workspace, summary = first
    records = tracking.lineage("igpt/1", tracking_uri=summary.tracking_uri)
    assert records[0]["kind"] == "model" and records[0]["version"] == "1"
    stages = {r["stage"] for r in records if r["kind"] == "run"}
    assert {"pretrain", "palette", "tokenize-train"} <= stages
    sources = {r["digest"] for r in records if r["kind"] == "dataset" and r["dataset_kind"] == "source"}
    assert open_source(str(data["train"])).digest() in sources
    palettes = {r["digest"] for r in records if r["kind"] == "dataset" and r["dataset_kind"] == "palette"}
    assert summary.stages["palette"]["palette_digest"] in palettes
    assert any(r["kind"] == "code" for r in records)
    text = tracking.format_lineage(records)
    assert text.splitlines()[0].startswith("model igpt v1")
    by_run = tracking.lineage(summary.stages["pretrain"]["run_id"], tracking_uri=summary.tracking_uri)
    assert by_run[0]["kind"] == "run" and by_run[0]["stage"] == "pretrain"

    # the classifier: its finetune run -> the pretrained igpt version -> its pretrain run -> the data
    records = tracking.lineage("igpt-classifier/1", tracking_uri=summary.tracking_uri)
    assert [(r["kind"], r.get("name"), r["depth"]) for r in records if r["kind"] == "model"] == [
        ("model", "igpt-classifier", 0),
        ("model", "igpt", 2),
    ]
    pretrained = next(r for r in records if r["kind"] == "model" and r["name"] == "igpt")
    assert pretrained["via"] == "fine-tuned from" and pretrained["version"] == "1"
    runs = {r["stage"]: r for r in records if r["kind"] == "run"}
    assert runs["finetune"]["depth"] == 1 and runs["pretrain"]["depth"] == 3
    sources = {r["digest"] for r in records if r["kind"] == "dataset" and r["dataset_kind"] == "source"}
    assert open_source(str(data["train"])).digest() in sources
    text = tracking.format_lineage(records)
    assert text.splitlines()[0].startswith("model igpt-classifier v1")
    assert "[fine-tuned from] model igpt v1" in text


@pytest.mark.slow
def test_retraining_tokenizes_only_new_data_and_warm_starts(first, data):
    from flows.pipeline import run_pipeline
    from flows.retrain import add_data
    from igpt_core import tracking
    from igpt_core.shards import read_meta
    from igpt_core.sources import open_source

    workspace, summary = first
    nothing = run_pipeline(params(workspace, data, mode="retrain"))
    assert "no new data" in nothing.note and nothing.model_version is None and not nothing.stages

    added = add_data([data["new"]], workspace / "incoming")
    assert len(added["batches"]) == 1
    assert added["event_id"] is not None  # the test server takes events
    retrained = run_pipeline(params(workspace, data, mode="retrain"))
    assert retrained.model_version == "2"
    assert "palette" not in retrained.stages  # no drift on more digits, no refit asked
    counts = retrained.stages["split"]["counts"]
    assert counts["train"] + counts["heldout"] == 80
    meta = read_meta(retrained.stages["tokenize-train"]["dir"])
    mixed = retrained.stages["replay"]["counts"]  # the new train split and a replayed half as many of v1's
    assert mixed["new"] == counts["train"] and mixed["replay"] == round(0.5 * counts["train"])
    assert meta["splits"]["train"]["counts"]["written"] == mixed["train"]
    pretrain = retrained.stages["pretrain"]
    assert pretrain["start_step"] == 6 and pretrain["step"] == 10
    # warm-started from the registered v1 checkpoint (pretrain(init_from=...)), recorded in its config
    from igpt_core.checkpoint import read_config

    lineage = read_config(pretrain["checkpoint"])["init_from"]
    assert lineage["step"] == 6 and "igpt-v1" in Path(lineage["path"]).parts

    client = mlflow_client(workspace)
    version = client.get_model_version("igpt", "2")
    assert version.tags["igpt.parent_model"] == "igpt/1"
    assert version.tags["igpt.palette_refit"] == "no"
    new_digest = open_source(str(workspace / "incoming" / added["batches"][0])).digest()
    assert new_digest in version.tags["igpt.new_data"]
    records = tracking.lineage("igpt/2", tracking_uri=summary.tracking_uri)
    models = [r["version"] for r in records if r["kind"] == "model"]
    assert models == ["2", "1"]
    sources = {r["digest"] for r in records if r["kind"] == "dataset" and r["dataset_kind"] == "source"}
    assert new_digest in sources and open_source(str(data["train"])).digest() in sources
    # the retrained model's classifier starts from it, and its lineage reaches both versions
    assert retrained.classifier_version == "3"
    assert client.get_model_version("igpt-classifier", "3").tags["igpt.pretrained_model"] == "igpt/2"
    records = tracking.lineage("igpt-classifier/3", tracking_uri=summary.tracking_uri)
    assert [(r["name"], r["version"]) for r in records if r["kind"] == "model"] == [
        ("igpt-classifier", "3"),
        ("igpt", "2"),
        ("igpt", "1"),
    ]

    again = run_pipeline(params(workspace, data, mode="retrain"))
    assert "no new data" in again.note and again.model_version is None

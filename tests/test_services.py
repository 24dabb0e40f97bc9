"""The real services path: infra/up.sh on free ports -> `prefect deployment run igpt/full-pipeline` run by
the process worker -> Completed, with the runs and the registered model on the MLflow server ->
`igpt data add` emits igpt.data.added and the automation's retrain-on-new-data run registers a new
version -> infra/down.sh, after which none of the recorded processes is alive."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
# Small enough for a shared 2-core machine; the deployment's defaults are the demo's.
RUN_PARAMS = {"clusters": 8, "resolution": 8, "steps": 6, "batch_size": 8, "samples": 2, "probe_limit": 40}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    home = tmp_path_factory.mktemp("services-home")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(
        IGPT_HOME=str(home),
        IGPT_PREFECT_PORT=str(prefect_port),
        IGPT_MLFLOW_PORT=str(mlflow_port),
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        PATH=f"{BIN}:{os.environ['PATH']}",
    )
    up = subprocess.run(
        ["bash", str(REPO / "infra" / "up.sh")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    pidfile = home / "services" / "services.pids"
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield {
            "env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"},
            "api": f"http://127.0.0.1:{prefect_port}/api",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "home": home,
            "pidfile": pidfile,
            "up": up.stdout,
        }
    finally:
        subprocess.run(["bash", str(REPO / "infra" / "down.sh")], env=env, cwd=REPO, timeout=120)


def test_up_deploys_all_three_deployments(services):
    api = services["api"]
    names = {d["name"] for d in get_json(f"{api}/deployments/filter", {})}
    assert {"full-pipeline", "retrain-nightly", "retrain-on-new-data"} <= names
    nightly = get_json(f"{api}/deployments/name/igpt/retrain-nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert nightly["parameters"] == {"params": {"mode": "retrain"}}
    assert nightly["work_pool_name"] == "process"
    automations = get_json(f"{api}/automations/filter", {})
    triggers = [a["trigger"] for a in automations]
    assert any("igpt.data.added" in t.get("expect", []) for t in triggers)
    lines = [line.split() for line in services["pidfile"].read_text().splitlines()]
    assert [line[0] for line in lines] == ["prefect-server", "mlflow-server", "prefect-worker"]


def test_deployment_run_completes_and_lands_in_mlflow(services):
    from igpt_core import tracking

    run = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "igpt/full-pipeline",
            "--params",
            json.dumps({"params": RUN_PARAMS}),
            "--watch",
            "--watch-timeout",
            "900",
        ],
        env=services["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=960,
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", run.stdout)
    assert match, f"no flow run id in:\n{run.stdout}\n{run.stderr}"
    flow_run = get_json(f"{services['api']}/flow_runs/{match.group(1)}")
    worker_log = (services["home"] / "services" / "prefect-worker.log").read_text()[-3000:]
    assert flow_run["state"]["type"] == "COMPLETED", (
        f"{flow_run['state']}\n{run.stdout[-3000:]}\n{worker_log}"
    )

    client = tracking.client(services["mlflow"])
    experiment = client.get_experiment_by_name("igpt")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{match.group(1)}'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    stages = sorted(r.data.tags["igpt.stage"] for r in children)
    assert stages == [
        "palette",
        "pretrain",
        "probe",
        "samples",
        "split",
        "tokenize-heldout",
        "tokenize-train",
    ]
    version = tracking.latest_version(client, "igpt")
    assert version is not None and version.tags["igpt.parent_run"] == parents[0].info.run_id
    # The workspace is the worker's IGPT_HOME, and artifacts went through the server into it.
    assert any((services["home"] / "checkpoints").iterdir())
    assert any((services["home"] / "mlartifacts").rglob("model.safetensors"))


FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def poll(fetch, done, timeout_s: float, interval_s: float = 2.0):
    """Calls `fetch` until `done(value)` or `timeout_s` passes; returns the last value either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)  # pacing between polls of a real server, not a stand-in for a condition


def test_data_added_event_triggers_a_retrain_that_registers_a_new_version(services, tmp_path):
    """`igpt data add` -> igpt.data.added on the server -> the automation runs igpt/retrain-on-new-data
    on the worker -> Completed, and MLflow has a new version trained on exactly the added batch.

    The trigger passes `params` whole ({mode: retrain, watch: <from the event>}), so the run uses the
    deployment as deployed: the other parameters are the flow's defaults (100 more steps of 16 images),
    which at the 8x8 resolution of the registered model is small. The new batch is 400 labelled digits
    (pretrain holds 4 batches of 16 train images out for evaluation, so a batch much under ~100 images
    fails there) that the registry has never recorded in `igpt.new_data`, so a new version is what the run
    must produce."""
    from sklearn.datasets import load_digits

    from igpt_core import tracking
    from igpt_core.sources import open_source
    from igpt_core.split import write_npz

    api = services["api"]
    deployment = get_json(f"{api}/deployments/name/igpt/retrain-on-new-data")

    def data_added_automations() -> list[dict]:
        return [
            a
            for a in get_json(f"{api}/automations/filter", {})
            if a["enabled"]
            and "igpt.data.added" in a["trigger"].get("expect", [])
            and any(act.get("deployment_id") == deployment["id"] for act in a["actions"])
        ]

    automations = poll(data_added_automations, bool, timeout_s=60)
    assert len(automations) == 1, get_json(f"{api}/automations/filter", {})
    automation_id = automations[0]["id"]

    client = tracking.client(services["mlflow"])
    before = [int(v.version) for v in tracking.all_versions(client, "igpt")]
    assert before, "the full-pipeline test registers the version a retrain continues"

    digits = load_digits()
    images = np.round(digits.images[400:800] * 255 / 16).astype(np.uint8)
    batch = write_npz(tmp_path / "new-digits.npz", images, digits.target[400:800].astype(np.int64))
    watch = services["home"] / "incoming"
    added = subprocess.run(
        [str(BIN / "igpt"), "data", "add", str(batch), "--to", str(watch)],
        env=services["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert added.returncode == 0, f"{added.stdout}\n{added.stderr}"
    result = ast.literal_eval(added.stdout.strip().splitlines()[-1])
    assert result["event_id"] is not None and len(result["batches"]) == 1, added.stdout
    watched = result["watch"]  # add_data resolves the folder; the event and the run carry this path
    new_digest = open_source(str(Path(watched) / result["batches"][0])).digest()

    # The automation's RunDeployment action keys the flow run "automation <id>, action 0, invocation ..".
    def triggered_runs() -> list[dict]:
        runs = get_json(
            f"{api}/flow_runs/filter",
            {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
        )
        return [r for r in runs if (r.get("idempotency_key") or "").startswith(f"automation {automation_id}")]

    runs = poll(triggered_runs, bool, timeout_s=120)
    logs = services["home"] / "services"
    assert len(runs) == 1, f"{runs}\n{(logs / 'prefect-server.log').read_text()[-3000:]}"
    flow_run_id = runs[0]["id"]
    assert runs[0]["parameters"] == {"params": {"mode": "retrain", "watch": watched}}

    flow_run = poll(
        lambda: get_json(f"{api}/flow_runs/{flow_run_id}"),
        lambda run: run["state"]["type"] in FINAL_STATES,
        timeout_s=900,
    )
    worker_log = (logs / "prefect-worker.log").read_text()[-3000:]
    assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{worker_log}"

    experiment = client.get_experiment_by_name("igpt")
    parents = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["igpt.watch"] == watched
    assert parents[0].data.metrics["batches_new"] == 1
    versions = tracking.all_versions(client, "igpt")
    assert [int(v.version) for v in versions] == [*before, max(before) + 1]
    version = versions[-1]
    assert version.tags["igpt.parent_model"] == f"igpt/{max(before)}"
    assert json.loads(version.tags["igpt.new_data"]) == [new_digest]
    assert version.tags["igpt.parent_run"] == parents[0].info.run_id


def test_down_stops_exactly_the_recorded_processes(services):
    entries = [line.split() for line in services["pidfile"].read_text().splitlines()]
    assert all(start_time(int(pid)) == int(started) for _, pid, started in entries)
    env = {k: v for k, v in services["env"].items() if k != "PREFECT_API_URL"}
    down = subprocess.run(
        ["bash", str(REPO / "infra" / "down.sh")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert all(start_time(int(pid)) != int(started) for _, pid, started in entries)

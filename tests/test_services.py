"""The real services path: infra/up.sh on free ports -> `prefect deployment run igpt/full-pipeline` run by
the process worker -> Completed, with the runs and the registered model on the MLflow server ->
`igpt data add` emits igpt.data.added and the automation's retrain-on-new-data run registers a new
version -> `make down`, which stops every service on its own SIGTERM and exits 0 with none of the
recorded processes, nor anything in their process groups, alive.

The first tests (not slow) pin infra/services_procs.py on stand-in processes: how up.sh starts a
service, and how down.sh stops one that ignores SIGTERM or is only waiting to be reaped."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _infra import load_infra

procs = load_infra("services_procs")

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


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that run (a zombie has exited: it only waits to be reaped)."""
    live = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and start_time(int(entry.name)) is not None:
                    live.append(int(entry.name))
            except ProcessLookupError:
                continue
    return live


def ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals (SigIgn in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)


def is_ignored(mask: int, signum: int) -> bool:
    return bool(mask >> (signum - 1) & 1)


# A stand-in service: prints its pid once it is ready, then waits for a signal.
READY = "import os, signal, sys, time\n{setup}\nprint(os.getpid(), flush=True)\ntime.sleep(600)"


def start_stand_in(tmp_path: Path, name: str, setup: str = "") -> tuple[subprocess.Popen, int]:
    """Starts a stand-in the way infra/up.sh starts a service (`cmd &` in a bash script, through
    `services_procs.py session`); returns the launching bash and the stand-in's pid once it is ready."""
    script = tmp_path / f"{name}.sh"
    script.write_text(
        f'{sys.executable} {procs.__file__} session {sys.executable} -c "$1" &\necho $!\nwait\n'
    )
    launcher = subprocess.Popen(
        ["bash", str(script), READY.format(setup=setup)], stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    assert int(launcher.stdout.readline()) == pid  # the same pid: `session` execs, it does not fork
    return launcher, pid


def test_session_starts_a_background_service_with_sigint_not_ignored(tmp_path):
    """The Prefect worker stops on SIGTERM by sending itself SIGINT; `setsid cmd &` in up.sh handed it
    SIGINT ignored (what a non-interactive shell does to background commands), so it never stopped."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    control = subprocess.run(
        ["bash", "-c", f'{sys.executable} -c "{probe}" & wait'], capture_output=True, text=True, timeout=120
    )
    assert control.stdout.strip() == "True", "bash no longer ignores SIGINT for `cmd &`"

    launcher, pid = start_stand_in(tmp_path, "service")
    try:
        mask = ignored_signals(pid)
        assert not is_ignored(mask, signal.SIGINT) and not is_ignored(mask, signal.SIGQUIT)
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        launcher.wait()


def test_stop_kills_what_ignores_sigterm_and_does_not_wait_on_zombies(tmp_path, capsys):
    """`stop` gives each recorded group one SIGTERM, SIGKILLs what ignores it after the grace period, and
    judges only once the killed processes are gone; a process that exited but is not reaped yet (the
    launching bash scripts reap theirs, this test reaps those scripts only at the end) counts as gone."""
    polite, polite_pid = start_stand_in(tmp_path, "polite")
    stubborn, stubborn_pid = start_stand_in(
        tmp_path, "stubborn", setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    )
    pids = {"polite": polite_pid, "stubborn": stubborn_pid}
    unrelated = subprocess.Popen(["sleep", "600"])
    pidfile = tmp_path / "services.pids"
    lines = [f"{name} {pid} {start_time(pid)}" for name, pid in pids.items()]
    # A recorded pid that now runs something else (another start time) is never signalled.
    lines.append(f"reused {unrelated.pid} {start_time(unrelated.pid) - 1}")
    pidfile.write_text("\n".join(lines) + "\n")
    try:
        assert procs.stop(pidfile, 1.0) == 0
        out = capsys.readouterr().out
        assert "polite stopped on SIGTERM" in out
        assert "stubborn stopped after SIGKILL" in out
        assert "reused" not in out
        assert procs.left_running(procs.read_pidfile(pidfile)) == {}
        assert all(live_in_group(pid) == [] for pid in pids.values())
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()
        for launcher in (polite, stubborn):
            launcher.wait(timeout=60)


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


@pytest.mark.slow
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


@pytest.mark.slow
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
        "finetune",
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
    # The fine-tuned classifier is registered on the server too, walking back to that igpt version.
    classifier = tracking.latest_version(client, tracking.CLASSIFIER_NAME)
    assert classifier is not None and classifier.tags["igpt.pretrained_model"] == f"igpt/{version.version}"
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_down_stops_exactly_the_recorded_processes(services):
    """After the deployment runs above, `make down` stops every service on its one SIGTERM (the grace
    period is generous for a loaded machine: a service that ignores SIGTERM never stops, however long),
    exits 0, and leaves nothing running in the recorded process groups; a second `make down` too."""
    entries = [line.split() for line in services["pidfile"].read_text().splitlines()]
    assert all(start_time(int(pid)) == int(started) for _, pid, started in entries)
    env = {k: v for k, v in services["env"].items() if k != "PREFECT_API_URL"}
    env["IGPT_SERVICES_STOP_S"] = "120"
    down = subprocess.run(
        ["make", "-s", "-C", str(REPO), "down"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(down.stdout)  # how each service stopped and how long it took, for the test report
    assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
    assert all(start_time(int(pid)) != int(started) for _, pid, started in entries)
    assert all(live_in_group(int(pid)) == [] for _, pid, _ in entries), down.stdout
    for name, _, _ in entries:
        assert f"{name} stopped on SIGTERM" in down.stdout, down.stdout
    assert "SIGKILL" not in down.stdout, down.stdout
    again = subprocess.run(
        ["make", "-s", "-C", str(REPO), "down"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"

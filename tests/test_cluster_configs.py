"""Cluster configs validate with Ray's own code; the storage verdict and the pid bookkeeping of the
local cluster scripts behave. Fast: nothing here starts Ray."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from igpt_core.storage import (
    SHARED_ENV,
    NodeView,
    StorageError,
    asserted_shared,
    check_shared_storage,
    decide,
    uri_scheme,
)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


# --- Ray cluster launcher -------------------------------------------------------------------------


def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher_config()))
    validate_config(prepared)  # the JSON schema in ray/autoscaler/ray-schema.json, plus Ray's checks

    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] in nodes
    gpu = [name for name, node in nodes.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu, "no node type offers a GPU for DDP training"
    assert nodes[gpu[0]]["min_workers"] >= 2, "pretraining across nodes needs at least two GPU workers"
    # The shared filesystem is mounted into every container at the same path.
    assert "-v /mnt/shared:/mnt/shared" in prepared["docker"]["run_options"]
    assert any("IGPT_SHARED_STORAGE=/mnt/shared" in cmd for cmd in prepared["setup_commands"])


def test_launcher_validation_rejects_a_broken_config():
    """The validation the test relies on does fail: a node type without node_config is refused."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = launcher_config()
    del broken["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(prepare_config(broken))


# --- KubeRay RayCluster ---------------------------------------------------------------------------

_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "image": {"type": "string", "pattern": r"^\S+:\S+$"},
        "resources": {
            "type": "object",
            "required": ["limits"],
            "properties": {"limits": {"type": "object", "required": ["cpu", "memory"]}},
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The fields the KubeRay operator (ray.io/v1 RayCluster CRD) needs to create pods, as a JSON schema.
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
                        "properties": {
                            "groupName": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "rayStartParams": _STRING_MAP,
                            "template": _POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def kuberay_documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / "kuberay-raycluster.yaml").read_text()) if doc]


def raycluster() -> dict:
    (cluster,) = [doc for doc in kuberay_documents() if doc.get("kind") == "RayCluster"]
    return cluster


def test_kuberay_raycluster_has_what_the_operator_needs():
    cluster = raycluster()
    jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)

    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Every Ray container mounts the one ReadWriteMany claim, and the claim exists in the manifest.
    (claim,) = [doc for doc in kuberay_documents() if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert mounts["shared"] == "/mnt/shared"


def test_kuberay_raycluster_translates_with_rays_kuberay_autoscaler():
    """Ray's own RayCluster -> autoscaler config translation (what the in-tree autoscaler runs on the
    head pod) accepts the manifest and validates its output against ray-schema.json."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(raycluster())
    nodes = config["available_node_types"]
    assert nodes["gpu-workers"]["resources"]["GPU"] == 1
    assert nodes["gpu-workers"]["resources"]["node_worker"] == 1
    assert nodes["headgroup"]["resources"]["node_head"] == 1
    assert config["max_workers"] == 8


def test_kuberay_schema_rejects_a_worker_group_without_ray_start_params():
    cluster = raycluster()
    del cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]
    with pytest.raises(jsonschema.ValidationError, match="rayStartParams"):
        jsonschema.validate(cluster, RAYCLUSTER_SCHEMA)


# --- Shared-storage verdict (the probe itself runs on two nodes in test_multinode.py) -------------


def view(node: str, sees: bool = True, reply: bool = True, error: str | None = None) -> NodeView:
    return NodeView(
        node_id=node * 8, hostname=f"host-{node}", sees_marker=sees, reply_seen=reply, error=error
    )


def test_decide_accepts_a_path_every_node_sees():
    check = decide("/mnt/shared/x", [view("a"), view("b")])
    assert check.shared and "2 nodes" in check.reason


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (view("b", sees=False, reply=False), "does not see the file the driver wrote"),
        (view("b", reply=False), "reply file there that the driver does not see"),
        (view("b", sees=False, reply=False, error="cannot read x: Permission denied"), "Permission denied"),
    ],
)
def test_decide_names_the_node_that_does_not_share_the_path(bad, message):
    with pytest.raises(StorageError) as info:
        decide("/local/x", [view("a"), bad])
    text = str(info.value)
    assert text.startswith("/local/x: not shared by all 2 nodes")
    assert "host-b" in text and message in text and "host-a" not in text
    assert SHARED_ENV in text


def test_object_store_uris_need_no_probe():
    # No Ray is started for these: the verdict comes from the scheme alone.
    for uri in ("s3://bucket/igpt", "gs://bucket/igpt", "abfss://c@acct.dfs.core.windows.net/igpt"):
        check = check_shared_storage(uri)
        assert check.shared and check.nodes == ()
    assert uri_scheme("/plain/path") is None and uri_scheme("S3://b/k") == "s3"
    with pytest.raises(StorageError, match="unknown storage scheme 'ftp'"):
        check_shared_storage("ftp://host/x")


def test_a_user_can_assert_a_path_shared(tmp_path):
    shared = tmp_path / "nfs"
    env = {SHARED_ENV: os.pathsep.join(["/elsewhere", str(shared)])}
    assert asserted_shared(shared / "igpt-home", env)
    assert not asserted_shared(tmp_path / "local", env)
    assert asserted_shared("/anything", {SHARED_ENV: "1"})
    assert not asserted_shared("/anything", {})


# --- Local cluster script helpers ------------------------------------------------------------------


def run_helper(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_ray_ports_are_distinct_and_free():
    ports = [int(p) for p in run_helper(str(INFRA / "ray_ports.py"), "11").split()]
    assert len(ports) == len(set(ports)) == 11
    assert all(1024 <= port <= 65535 for port in ports)


def test_ray_pids_tracks_a_process_tree_by_start_time():
    """`tree` finds a child of a started process; `alive` drops it once it exited, and never accepts a
    live pid with a different start time (pid reuse)."""
    # The grandchild inherits both pipes: its "ready" line proves the tree exists; closing stdin ends it.
    child = "import sys; print('ready', flush=True); sys.stdin.read()"
    parent_script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        entries = run_helper(str(INFRA / "ray_pids.py"), "tree", str(parent.pid)).split()
        assert len(entries) == 2 and entries[0].startswith(f"{parent.pid}:")
        assert run_helper(str(INFRA / "ray_pids.py"), "alive", *entries).split() == entries
        pid, started = entries[0].split(":")
        assert run_helper(str(INFRA / "ray_pids.py"), "alive", f"{pid}:{int(started) + 1}") == ""
    finally:
        parent.stdin.close()
        parent.wait(timeout=60)
    assert run_helper(str(INFRA / "ray_pids.py"), "alive", *entries) == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--head-cpus", "two"], "--head-cpus must be a non-negative integer"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_ray_up_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(INFRA / "ray_up.sh"), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr

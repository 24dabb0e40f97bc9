"""igpt on a real two-node Ray cluster (infra/ray_up.sh: a head and a second node joined with
`ray start --address`, on this machine).

One cluster for the whole module. Every stage runs in a separate driver process with RAY_ADDRESS set,
the way a user points igpt at a cluster; this process only reads Ray's own state (the dashboard's
state API) to see which node did what, and compares results with a one-node run (`ray_local`).
The last test stops the cluster with infra/ray_down.sh and checks that every process it started is gone.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _infra import load_infra

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 8  # training data: sklearn digits are 8x8, so no resizing and 64-token images
CLUSTERS = 16
# Palette and tokenize data: 6,000 CIFAR-10 images in 4 webdataset tars. Parts must take longer than a
# worker start to be spread: Ray hands a part that takes milliseconds to the worker it already has rather
# than wait for a worker process to start on the other node.
CIFAR_IMAGES, CIFAR_TARS = 6000, 4


ray_cluster = load_infra("ray_cluster")


def ray_failing_once(root: Path) -> Path:
    """A `ray` executable whose first `ray start --head` leaves a process in its group, prints Ray's
    startup-timeout message and exits 1; every other call is the real `ray`."""
    real = Path(sys.executable).with_name("ray")
    wrapper = root / "ray-failing-once"
    wrapper.write_text(
        textwrap.dedent(
            f"""\
            #!/usr/bin/env bash
            if [[ "$1 $2" == "start --head" && ! -e {root}/failed-once ]]; then
                touch {root}/failed-once
                sleep 600 &
                echo "$!" > {root}/left-behind.pid
                echo "Exception: The current node timed out during startup. (injected by the test)"
                exit 1
            fi
            exec {real} "$@"
            """
        )
    )
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator:
    """The two-node cluster; its worker node sees `private_dir` as its own empty tmpfs.

    It is started through a `ray` that fails the first head start the way Ray does when a raylet
    misses its 30 s to register (leaving a process behind in the node's group), so ray_up.sh has to
    stop that attempt and start again; test_ray_up_starts_again_after_a_node_failed checks it did."""
    root = tmp_path_factory.mktemp("multinode")
    env = dict(os.environ, IGPT_RAY_BIN=str(ray_failing_once(root)))
    started = ray_cluster.LocalCluster.start(root / "state", worker_private_dir=root / "node-local", env=env)
    try:
        yield started
    finally:
        started.stop()  # a no-op when test_ray_down_stops_every_process_it_started already did it


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    """A folder of 4 .npz files of real images (sklearn's digits as RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    folder = tmp_path_factory.mktemp("digits")
    for i, rows in enumerate(np.array_split(np.arange(len(images)), 4)):
        np.savez(folder / f"digits-{i}.npz", x=images[rows], y=digits.target[rows].astype(np.int64))
    return folder


def file_digests(folder: Path, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def test_two_nodes_alive_with_their_own_resources(cluster):
    nodes = cluster.run_driver(
        """
        import json, ray
        ray.init()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        print("RESULT", json.dumps([n["Resources"] for n in nodes]))
        """,
    )
    assert len(nodes) == 2
    assert sorted("node_head" in n for n in nodes) == [False, True]
    assert all(n["CPU"] == 1 for n in nodes)
    assert set(cluster.node_ids()) == {"head", "worker"}


def test_ray_up_starts_again_after_a_node_failed(cluster):
    """The fixture's first head start failed (see ray_failing_once): ray_up.sh said so, stopped what
    that attempt left running, and the second attempt is the cluster every other test here uses."""
    root = cluster.state_dir.parent
    assert (root / "failed-once").exists()
    assert "timed out during startup. (injected by the test)" in cluster.start_output
    assert "attempt 1 of 3 failed" in cluster.start_output
    left_behind = int((root / "left-behind.pid").read_text())
    stat = Path(f"/proc/{left_behind}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", (
        "attempt 1 left a process"
    )
    assert cluster.alive_pids() == list(cluster.pids)


def test_shared_storage_check_tells_shared_from_node_local(cluster, tmp_path):
    """A path both nodes see passes; the directory only the head sees (the worker node has its own
    tmpfs there, as a second machine has its own disk) fails, naming the worker node."""
    shared = tmp_path / "shared"
    result = cluster.run_driver(
        f"""
        import json
        from igpt_core.storage import StorageError, check_shared_storage
        ok = check_shared_storage({str(shared)!r})
        try:
            check_shared_storage({str(cluster.private_dir / "run")!r})
            error = None
        except StorageError as err:
            error = str(err)
        print("RESULT", json.dumps({{"ok": [ok.shared, ok.reason, len(ok.nodes)], "error": error}}))
        """,
    )
    assert result["ok"] == [True, "probed: all 2 nodes see the same files", 2]
    error = result["error"]
    assert error is not None and "not shared by all 2 nodes" in error
    assert f"node {cluster.node_ids()['worker'][:12]}" in error
    assert f"node {cluster.node_ids()['head'][:12]}" not in error
    assert list(shared.iterdir()) == [], "the probe left marker files behind"


@pytest.fixture(scope="module")
def cifar_parts(cifar_dir, tmp_path_factory) -> str:
    """The first CIFAR_IMAGES samples of train-000000.tar, re-packed unchanged into CIFAR_TARS tars."""
    import tarfile

    folder = tmp_path_factory.mktemp("cifar-parts")
    per_tar = CIFAR_IMAGES // CIFAR_TARS
    with tarfile.open(cifar_dir / "train-000000.tar") as source:
        keys: list[str] = []
        members: dict[str, list] = {}
        for member in source:
            key = member.name.rsplit(".", 1)[0]
            if key not in members:
                if len(keys) == CIFAR_IMAGES:
                    break
                keys.append(key)
            members.setdefault(key, []).append((member, source.extractfile(member).read()))
    for number in range(CIFAR_TARS):
        with tarfile.open(folder / f"part-{number}.tar", "w") as out:
            for key in keys[number * per_tar : (number + 1) * per_tar]:
                for member, data in members[key]:
                    out.addfile(member, io.BytesIO(data))
    return str(folder)


@pytest.fixture(scope="module")
def single_node(ray_local, cifar_parts, tmp_path_factory) -> dict:
    """Palette and shards of the same source on a one-node Ray, for comparison."""
    from igpt_core.palette_fit import fit_palette
    from igpt_core.tokens import tokenize

    out = tmp_path_factory.mktemp("single-node")
    palette = fit_palette(cifar_parts, clusters=CLUSTERS, resolution=32, progress=False)
    palette.save(out / "palette")
    tokenize(cifar_parts, palette, out / "shards", resolution=32, shard_size=1000, progress=False)
    return {"palette": out / "palette", "shards": out / "shards"}


@pytest.fixture(scope="module")
def two_node_data(cluster, cifar_parts, tmp_path_factory) -> dict:
    """Palette and shards made by one driver on the two-node cluster, with its Ray job id."""
    out = tmp_path_factory.mktemp("two-node")
    result = cluster.run_driver(
        f"""
        import json, ray
        from igpt_core.palette_fit import fit_palette
        from igpt_core.tokens import tokenize
        from igpt_core.storage import check_shared_storage
        # What a multi-node run does before writing: check that every node sees the output folder.
        # It also starts a worker process on each node, so the first parts need not wait for one.
        check_shared_storage({str(out)!r})
        palette = fit_palette({cifar_parts!r}, clusters={CLUSTERS}, resolution=32, progress=False)
        palette.save({str(out / "palette")!r})
        tokenize({cifar_parts!r}, palette, {str(out / "shards")!r}, resolution=32, shard_size=1000,
                 progress=False)
        print("RESULT", json.dumps({{"job_id": ray.get_runtime_context().get_job_id()}}))
        """,
    )
    return {"palette": out / "palette", "shards": out / "shards", "job_id": result["job_id"]}


def test_palette_statistics_run_on_both_nodes_and_match_one_node(cluster, two_node_data, single_node):
    tasks = cluster.tasks(two_node_data["job_id"], "_part_counts_remote", expected=CIFAR_TARS)
    assert len(tasks) == CIFAR_TARS and all(task.state == "FINISHED" for task in tasks)  # one per tar
    assert {task.node_id for task in tasks} == set(cluster.node_ids().values())
    assert (two_node_data["palette"] / "palette.npy").read_bytes() == (
        single_node["palette"] / "palette.npy"
    ).read_bytes()


def test_tokenize_runs_on_both_nodes_and_shards_are_byte_identical(cluster, two_node_data, single_node):
    # tokens.tokenize maps its local function `task` over the parts
    tasks = cluster.tasks(two_node_data["job_id"], "task", expected=CIFAR_TARS)
    assert len(tasks) == CIFAR_TARS and all(task.state == "FINISHED" for task in tasks)
    assert {task.node_id for task in tasks} == set(cluster.node_ids().values())
    two, one = file_digests(two_node_data["shards"], "*.tar"), file_digests(single_node["shards"], "*.tar")
    assert len(two) == 8 and two == one  # each 1,500-image part in shards of 1,000 and 500
    assert (two_node_data["shards"] / "manifest.parquet").read_bytes() == (
        single_node["shards"] / "manifest.parquet"
    ).read_bytes()


@pytest.fixture(scope="module")
def digits_shards(ray_local, digits_npz, tmp_path_factory) -> dict:
    """Training data: the digits tokenized with a digits palette (made once, in this process)."""
    from igpt_core.palette_fit import fit_palette
    from igpt_core.tokens import tokenize

    out = tmp_path_factory.mktemp("digits-shards")
    palette = fit_palette(str(digits_npz), clusters=CLUSTERS, resolution=RESOLUTION, progress=False)
    palette.save(out / "palette")
    tokenize(str(digits_npz), palette, out / "shards", resolution=RESOLUTION, shard_size=200, progress=False)
    return {"palette": out / "palette", "shards": out / "shards"}


# A model and run small enough for two 1-CPU nodes: 8x8 images, 64 tokens, one block.
TINY_MODEL = dict(vocab_size=CLUSTERS, resolution=RESOLUTION, n_layer=1, n_head=2, n_embd=32)
TINY_TRAIN = dict(
    steps=8, batch_size=16, workers=2, warmup_steps=2, log_every=2, eval_every=8, eval_batches=1,
    checkpoint_every=8, placement_strategy="SPREAD",
)  # fmt: skip


def test_pretrain_runs_one_ddp_worker_per_node_and_matches_one_node(cluster, digits_shards, tmp_path):
    """workers=2 on the cluster: Ray's actor table puts one Ray Train worker on each node, and the
    loss curve is the one the same run gives on a one-node Ray (same data split, same seeds)."""
    from igpt_core.config import ModelConfig, TrainConfig
    from igpt_core.pretrain import pretrain

    shards, palette = digits_shards["shards"], digits_shards["palette"]
    result = cluster.run_driver(
        f"""
        import json, ray
        from igpt_core.config import ModelConfig, TrainConfig
        from igpt_core.pretrain import pretrain
        result = pretrain({str(shards)!r}, {str(tmp_path / "two-node")!r}, model=ModelConfig(**{TINY_MODEL!r}),
                          train=TrainConfig(**{TINY_TRAIN!r}), palette_dir={str(palette)!r})
        print("RESULT", json.dumps({{"job_id": ray.get_runtime_context().get_job_id(), "step": result.step,
                                    "history": result.history}}))
        """,
    )
    workers = cluster.actors("RayTrainWorker", result["job_id"])
    assert len(workers) == 2
    assert sorted(actor.node_id for actor in workers) == sorted(cluster.node_ids().values())

    one_node = pretrain(
        shards, tmp_path / "one-node", model=ModelConfig(**TINY_MODEL), train=TrainConfig(**TINY_TRAIN),
        palette_dir=palette,
    )  # fmt: skip
    assert result["step"] == one_node.step == TINY_TRAIN["steps"]
    two_curve = [(r["step"], r["loss"]) for r in result["history"]]
    one_curve = [(r["step"], r["loss"]) for r in one_node.history]
    assert [s for s, _ in two_curve] == [s for s, _ in one_curve] == list(range(2, 9, 2))
    np.testing.assert_allclose([v for _, v in two_curve], [v for _, v in one_curve], rtol=1e-4)
    assert two_curve[-1][1] < two_curve[0][1]  # and it learns


def test_igpt_flow_runs_on_the_cluster(cluster, tmp_path):
    """The whole `igpt` Prefect flow (flows.pipeline.run_pipeline) in a driver with RAY_ADDRESS set:
    it completes, registers a model, and its Ray work ran on both nodes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    np.savez(tmp_path / "train.npz", x=images[:240], y=digits.target[:240].astype(np.int64))
    np.savez(tmp_path / "heldout.npz", x=images[240:320], y=digits.target[240:320].astype(np.int64))
    params = dict(
        source=str(tmp_path / "train.npz"), heldout=str(tmp_path / "heldout.npz"),
        workspace=str(tmp_path / "igpt-home"), clusters=8, resolution=8, steps=6, batch_size=8, workers=2,
        probe=False, samples=0, finetune=False,
    )  # fmt: skip
    result = cluster.run_driver(
        f"""
        import json, os, ray
        # Prefect's temporary server for this run only, in its own home (nothing shared with other runs).
        os.environ["PREFECT_HOME"] = {str(tmp_path / "prefect-home")!r}
        os.environ.pop("PREFECT_API_URL", None)
        from flows.pipeline import PipelineParams, run_pipeline
        summary = run_pipeline(PipelineParams(**{params!r}))
        print("RESULT", json.dumps({{"job_id": ray.get_runtime_context().get_job_id(),
                                    "stages": sorted(summary.stages), "model_version": summary.model_version,
                                    "step": summary.stages["pretrain"].get("step")}}))
        """,
        timeout_s=600,
    )
    assert {"palette", "tokenize-train", "tokenize-heldout", "pretrain"} <= set(result["stages"])
    assert result["model_version"] is not None
    workers = cluster.actors("RayTrainWorker", result["job_id"])
    assert sorted(actor.node_id for actor in workers) == sorted(cluster.node_ids().values())


def test_ray_down_stops_every_process_it_started(cluster, ray_local):
    """Runs last in this module: ray_down.sh stops exactly the recorded processes and what they spawned
    since (task workers), and no other Ray on the machine (this process's one-node Ray lives on)."""
    assert cluster.alive_pids() == list(cluster.pids)
    tree = [str(REPO / "infra" / "ray_pids.py"), "tree", str(cluster.head_pid), str(cluster.worker_pid)]
    spawned = subprocess.run(
        [sys.executable, *tree], capture_output=True, text=True, check=True
    ).stdout.split()
    cluster.stop()
    assert [entry for entry in {*cluster.pids, *spawned} if ray_cluster.pid_alive(entry)] == []
    assert not (cluster.state_dir / "cluster.env").exists()
    assert ray_local.get(ray_local.put("still here")) == "still here"

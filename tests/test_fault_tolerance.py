"""Failures on a real two-node Ray cluster (infra/ray_up.sh), injected for real: a tokenization task's
worker process exits mid-part, a Ray Train worker process is SIGKILLed mid-training, and a run is
trained on shards that do not divide over the workers.

One cluster for the module; every run is a separate driver process with RAY_ADDRESS set. Killing the
pretrain driver itself and rerunning it is tested on one node in test_train.py (the rerun path does
not depend on how many nodes the cluster has), so it is not repeated here.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _infra import latest_registered_step, load_infra

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 8
CLUSTERS = 16


ray_cluster = load_infra("ray_cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator:
    started = ray_cluster.LocalCluster.start(tmp_path_factory.mktemp("fault") / "state")
    try:
        yield started
    finally:
        started.stop()


def digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=3)
    return images, digits.target.astype(np.int64)


def write_npz_parts(folder: Path, sizes: list[int]) -> Path:
    """A source folder of .npz files of real images with the given sizes (one part each)."""
    images, labels = digits_rgb()
    folder.mkdir(parents=True)
    start = 0
    for i, size in enumerate(sizes):
        rows = slice(start, start + size)
        np.savez(folder / f"part-{i}.npz", x=images[rows], y=labels[rows])
        start += size
    return folder


@pytest.fixture(scope="module")
def palette(ray_local, tmp_path_factory) -> Path:
    from igpt_core.palette_fit import fit_palette

    out = tmp_path_factory.mktemp("palette")
    fit_palette(digits_rgb()[0], clusters=CLUSTERS, resolution=RESOLUTION, progress=False).save(out)
    return out


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_tokenize_task_whose_worker_dies_is_retried_and_shards_are_identical(
    cluster, palette, ray_local, tmp_path
):
    """The worker running part-2 exits (os._exit) halfway through the part, on its first attempt only: a
    start-up hook in every worker process of the job wraps `sources.read_part`, and a marker file created
    with O_EXCL makes the crash happen once. Ray retries the task (map_parts max_retries); the shards are
    byte-identical to an undisturbed run."""
    from igpt_core.tokens import tokenize

    source = write_npz_parts(tmp_path / "source", [400, 400, 400, 400])
    marker = tmp_path / "crashed-once"
    result = cluster.run_driver(
        f"""
        import json, os, ray

        def crash_once_in_part_2():
            import igpt_core.sources as sources

            read_part = sources.read_part

            def crashing_read_part(part, resolution):
                for i, record in enumerate(read_part(part, resolution)):
                    if i == 200 and (part.path or "").endswith("part-2.npz"):
                        try:
                            fd = os.open({str(marker)!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                        except FileExistsError:
                            pass  # the retry: run through
                        else:
                            os.write(fd, str(os.getpid()).encode())
                            os.close(fd)
                            os._exit(1)  # the worker process dies, mid-part, shard half written
                    yield record

            sources.read_part = crashing_read_part

        ray.init(runtime_env={{"worker_process_setup_hook": crash_once_in_part_2}})
        from igpt_core.tokens import tokenize
        tokenize({str(source)!r}, {str(palette)!r}, {str(tmp_path / "shards")!r}, resolution={RESOLUTION},
                 shard_size=150, progress=False)
        print("RESULT", json.dumps({{"job_id": ray.get_runtime_context().get_job_id()}}))
        """
    )
    died = int(marker.read_text())
    assert not Path(f"/proc/{died}").exists()  # that worker process is gone

    # Ray's task table: part-2's task failed once with a dead worker, and its second attempt finished.
    tasks = cluster.tasks(result["job_id"], "task", expected=4)  # tokenize's per-part function
    attempts: dict[str, list] = {}
    for task in tasks:
        attempts.setdefault(task.task_id, []).append(task)
    assert len(attempts) == 4
    retried = [sorted(a, key=lambda t: t.attempt_number) for a in attempts.values() if len(a) > 1]
    assert len(retried) == 1
    first, second = retried[0]
    assert (first.attempt_number, first.state, first.error_type) == (0, "FAILED", "WORKER_DIED")
    assert (second.attempt_number, second.state) == (1, "FINISHED")

    undisturbed = tokenize(
        source, palette, tmp_path / "reference", resolution=RESOLUTION, shard_size=150, progress=False
    )
    assert undisturbed.meta["counts"]["written"] == 1600
    assert digests(tmp_path / "shards") == digests(tmp_path / "reference")
    assert len(digests(tmp_path / "reference")) == 12  # 3 shards per part, every part complete
    assert not list((tmp_path / "shards").glob(".*")), "a half-written temporary shard was left behind"


def start_driver(cluster, script: str, log: Path) -> subprocess.Popen:
    """A driver that runs in the background (its output to `log`)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=cluster.driver_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )


def driver_result(process: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    import json

    process.wait(timeout=timeout_s)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"driver failed ({process.returncode}):\n{text[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


PRETRAIN_SCRIPT = """
import json, ray
from igpt_core.config import ModelConfig, TrainConfig
from igpt_core.tokens import tokenize
from igpt_core.pretrain import pretrain
tokenize({source!r}, {palette!r}, {shards!r}, resolution=8, shard_size={shard_size}, progress=False)
result = pretrain({shards!r}, {out!r}, model=ModelConfig(**{model!r}), train=TrainConfig(**{train!r}),
                  palette_dir={palette!r})
print("RESULT", json.dumps({{"job_id": ray.get_runtime_context().get_job_id(), "step": result.step,
                            "history": result.history}}))
"""


def pretrain_script(
    source: Path, palette: Path, folder: Path, *, shard_size: int, model: dict, train: dict
) -> str:
    return PRETRAIN_SCRIPT.format(
        source=str(source),
        palette=str(palette),
        shards=str(folder / "shards"),
        out=str(folder / "run"),
        shard_size=shard_size,
        model=model,
        train=train,
    )


def test_train_worker_killed_mid_training_resumes_from_latest_checkpoint(cluster, palette, tmp_path):
    """SIGKILL one Ray Train worker process once the first checkpoint is registered: Ray Train restarts the
    worker group (FailureConfig(max_failures)), it resumes from that checkpoint and the run completes."""
    source = write_npz_parts(tmp_path / "source", [600, 600])
    model = dict(vocab_size=CLUSTERS, resolution=RESOLUTION, n_layer=2, n_head=2, n_embd=64)
    train = dict(
        steps=60, batch_size=32, workers=2, warmup_steps=5, log_every=10, eval_every=60, eval_batches=1,
        checkpoint_every=10, max_failures=2, placement_strategy="SPREAD",
    )  # fmt: skip
    log = tmp_path / "driver.log"
    # The polls below read a checkpoint with torch and Ray Train's Result: imported now, so that the first
    # poll is not seconds late (a model this small trains several checkpoints in that time)
    import torch  # noqa: F401
    from ray.train import Result  # noqa: F401

    driver = start_driver(
        cluster, pretrain_script(source, palette, tmp_path, shard_size=300, model=model, train=train), log
    )
    try:
        # The victim: the Ray Train worker on the second node, from Ray's actor table, found while the
        # first steps run so that the kill itself follows the first checkpoint without delay.
        deadline = time.monotonic() + 240
        victims: list = []
        while len(victims) != 1:
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no Ray Train worker on the second node within 240 s"
            worker_node = cluster.node_ids()["worker"]
            victims = [
                a for a in cluster.actors("RayTrainWorker") if a.state == "ALIVE" and a.node_id == worker_node
            ]
        (victim,) = victims
        # A checkpoint counts once Ray Train registered it (a folder already in storage but not yet
        # registered is not resumed from)
        run_dir = tmp_path / "run" / "ray" / "pretrain"
        while latest_registered_step(run_dir) is None:
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)  # polling the storage folder for Ray Train's first registered checkpoint
        os.kill(victim.pid, signal.SIGKILL)
        result = driver_result(driver, log, timeout_s=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    assert result["step"] == train["steps"]
    resumed = {r["resumed_from"] for r in result["history"]}
    assert len(resumed) == 2 and min(resumed) == 0 and max(resumed) >= train["checkpoint_every"]
    assert max(resumed) % train["checkpoint_every"] == 0  # from a checkpoint, not from scratch
    workers = cluster.actors("RayTrainWorker", result["job_id"])
    assert len(workers) == 4  # the first group (one killed) and the restarted group
    assert any(a.pid == victim.pid and a.state == "DEAD" for a in workers)
    assert result["history"][-1]["rank_steps"] == [train["steps"] - max(resumed)] * 2


def test_uneven_shards_train_on_both_nodes_without_hang_or_skipped_rank(cluster, palette, tmp_path):
    """Three shards (300, 300 and 7 samples) over two workers, one per node: every rank takes every step."""
    source = write_npz_parts(tmp_path / "source", [300, 300, 7])
    model = dict(vocab_size=CLUSTERS, resolution=RESOLUTION, n_layer=1, n_head=2, n_embd=32)
    train = dict(
        steps=10, batch_size=16, workers=2, warmup_steps=2, log_every=5, eval_every=10, eval_batches=1,
        checkpoint_every=10, placement_strategy="SPREAD",
    )  # fmt: skip
    result = cluster.run_driver(
        pretrain_script(source, palette, tmp_path, shard_size=300, model=model, train=train)
    )
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    from igpt_core.shards import read_manifest

    assert read_manifest(tmp_path / "shards").column("samples").to_pylist() == [300, 300, 7]
    assert len(shards) == 3
    assert result["step"] == 10
    assert result["history"][-1]["rank_steps"] == [10, 10]
    workers = cluster.actors("RayTrainWorker", result["job_id"])
    assert sorted(a.node_id for a in workers) == sorted(cluster.node_ids().values())

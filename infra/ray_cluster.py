"""Python handle on the two-node local cluster of ray_up.sh / ray_down.sh (for tests and benchmarks).

    with LocalCluster.start(state_dir) as cluster:
        subprocess.run([...], env=cluster.driver_env())   # a driver on the cluster

The scripts do the work; this module runs them, reads back DIR/cluster.env, and gives drivers the
environment they need (RAY_ADDRESS, RAY_AUTH_MODE=disabled).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
RESULT_PREFIX = "RESULT "


class ClusterError(RuntimeError):
    """ray_up.sh, ray_down.sh or a driver failed; the message carries their output."""


def read_state(state_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The KEY=VALUE lines of DIR/cluster.env (quotes stripped)."""
    values = {}
    for line in (Path(state_dir) / "cluster.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value.strip('"')
    return values


def pid_alive(entry: str) -> bool:
    """Is `pid:starttime` (as recorded by ray_pids.py) still the same running process?"""
    pid, _, started = entry.partition(":")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and fields[19] == started


@dataclass(frozen=True)
class LocalCluster:
    """A running two-node cluster started by ray_up.sh."""

    state_dir: Path
    address: str
    dashboard_url: str
    head_pid: int
    worker_pid: int
    pids: tuple[str, ...]
    """Every process ray_up.sh recorded, as pid:starttime."""
    private_dir: Path | None
    """A directory only the worker node sees as an empty tmpfs (node-local storage), if asked for."""
    start_output: str = ""
    """What ray_up.sh printed on stderr when this handle started the cluster (its retries, if any)."""

    @classmethod
    def start(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        worker_private_dir: str | os.PathLike[str] | None = None,
        head_cpus: int = 1,
        worker_cpus: int = 1,
        timeout_s: float = 300,
        env: dict[str, str] | None = None,
    ) -> LocalCluster:
        """Runs ray_up.sh (in `env`, default this process's environment) and returns the handle; raises
        ClusterError with its output if it fails."""
        args = ["bash", str(INFRA / "ray_up.sh"), "--state", str(state_dir)]
        args += ["--head-cpus", str(head_cpus), "--worker-cpus", str(worker_cpus)]
        if worker_private_dir is not None:
            args += ["--worker-private-dir", str(worker_private_dir)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
        if result.returncode != 0:
            raise ClusterError(f"ray_up.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return dataclasses.replace(cls.from_state(state_dir), start_output=result.stderr)

    @classmethod
    def from_state(cls, state_dir: str | os.PathLike[str]) -> LocalCluster:
        state = read_state(state_dir)
        private = state.get("IGPT_RAY_WORKER_PRIVATE_DIR") or None
        return cls(
            state_dir=Path(state_dir),
            address=state["RAY_ADDRESS"],
            dashboard_url=state["RAY_DASHBOARD_URL"],
            head_pid=int(state["IGPT_RAY_HEAD_PID"]),
            worker_pid=int(state["IGPT_RAY_WORKER_PID"]),
            pids=tuple(state["IGPT_RAY_PIDS"].split()),
            private_dir=Path(private) if private else None,
        )

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a driver process on this cluster."""
        env = dict(os.environ if base is None else base)
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        return env

    def run_driver(self, script: str, *, timeout_s: float = 300, cwd: Path = REPO) -> Any:
        """Runs `script` (dedented) in a new Python process as a driver on this cluster. The script
        prints its result as one `RESULT <json>` line, which is returned decoded."""
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=self.driver_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=cwd,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if result.returncode != 0 or not lines:
            raise ClusterError(
                f"driver exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
            )
        return json.loads(lines[-1][len(RESULT_PREFIX) :])

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "worker": node id}, from Ray's node table (custom resources tell them apart)."""
        from ray.util.state import list_nodes

        found = {}
        for node in list_nodes(address=self.dashboard_url, detail=True):
            if node.state == "ALIVE":
                for role in ("head", "worker"):
                    if node.resources_total.get(f"node_{role}"):
                        found[role] = node.node_id
        return found

    def tasks(self, job_id: str, function: str, *, expected: int, timeout_s: float = 60) -> list[Any]:
        """Every attempt of the job's tasks of `function` (its name, without module; Ray's task table),
        once it lists `expected` finished ones or `timeout_s` passed. Ray reports task events
        asynchronously, about a second behind, so a driver that just returned may not be listed yet."""
        from ray.util.state import list_tasks

        deadline = time.monotonic() + timeout_s
        while True:
            tasks = [
                task
                for task in list_tasks(
                    address=self.dashboard_url, filters=[("job_id", "=", job_id)], limit=10_000
                )
                if task.func_or_class_name.rsplit(".", 1)[-1] == function
            ]
            if sum(task.state == "FINISHED" for task in tasks) >= expected or time.monotonic() > deadline:
                return tasks
            time.sleep(0.5)  # polling Ray's state API: task events arrive asynchronously

    def actors(self, class_name: str, job_id: str | None = None) -> list[Any]:
        """Ray's actor table rows of `class_name` (of one job, if given), dead ones included."""
        from ray.util.state import list_actors

        filters: list[tuple[str, str, str]] = [("class_name", "=", class_name)]
        if job_id is not None:
            filters.append(("job_id", "=", job_id))
        return list_actors(address=self.dashboard_url, filters=filters, detail=True, limit=10_000)

    def alive_pids(self) -> list[str]:
        return [entry for entry in self.pids if pid_alive(entry)]

    def stop(self, timeout_s: float = 120) -> str:
        """Runs ray_down.sh; returns its output, raises ClusterError if a process survived."""
        args = ["bash", str(INFRA / "ray_down.sh"), "--state", str(self.state_dir)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise ClusterError(f"ray_down.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

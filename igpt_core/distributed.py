"""Ray helpers shared by the distributed stages: connect once, map a function over parts of the data.

Nothing here runs at import time; Ray itself is imported inside the functions so that
`import igpt_core` stays cheap.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

_RESOURCE_OPTIONS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")

# How often Ray Train's controller polls its workers (Ray's default: 2 s). Every state change of a run
# (workers scheduled, started, finished) waits for the next poll, so at 2 s a run spends ~5 s more than
# it needs in start-up and shutdown (a one-report TorchTrainer.fit: 11.2 s at 2 s, 6.4 s at 0.2 s). A
# poll is one small task per worker; a missed one is not a failure (Ray allows 10 minutes).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"


def job_env_vars() -> dict[str, str]:
    """The environment igpt's Ray jobs add for their workers: Ray Train's poll interval (0.25 s unless
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S is set here)."""
    return {TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)}


def ensure_ray(address: str | None = None, *, ray_logs: bool = False, num_cpus: int | None = None) -> None:
    """Connects this process to Ray once.

    An existing connection is reused as it is. Otherwise `address` (or the RAY_ADDRESS environment
    variable) names the cluster to join; without either, a local Ray is started (`"local"` as address
    always starts a fresh local instance).

    What Ray's worker processes print (Ray Train's controller and workers, each line prefixed with
    `(RayTrainWorker pid=...)`) stays in Ray's log files (`/tmp/ray/session_latest/logs`) unless
    `ray_logs`; an error raised in a worker still reaches this process as the exception `fit()` raises.

    A local Ray runs its API server (the dashboard process, on 127.0.0.1 and a free port): Ray Train's
    PlacementGroupCleaner asks the State API every second whether the run's controller is alive, and
    without that server each check fails and logs "Failed to query Ray Train Controller actor state".
    The server's address is handed to every worker (RAY_API_SERVER_ADDRESS), so the cleaner asks this
    instance, not whichever Ray instance on the machine it would otherwise pick. `num_cpus` caps a local
    instance (default: every CPU). Every job's workers get `job_env_vars()` (Ray Train's poll interval).
    """
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {
        "log_to_driver": ray_logs,
        "logging_level": logging.INFO if ray_logs else logging.ERROR,
    }
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        env_vars = job_env_vars()
        if not address.startswith("ray://") and address != "auto":
            # the cleaner's State API client resolves the dashboard through this cluster's GCS
            env_vars["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env={"env_vars": env_vars}, **quiet)
        return
    # "local" explicitly: a bare ray.init() would also join whatever cluster another process on this
    # machine started last (/tmp/ray/ray_current_cluster), which is not what "no address" means here.
    port = free_port()
    ray.init(
        address="local",
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        num_cpus=num_cpus,
        runtime_env={"env_vars": {**job_env_vars(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        **quiet,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def map_parts(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    desc: str,
    max_retries: int = 3,
    progress: bool = True,
    **resources: Any,
) -> list[R]:
    """Runs `fn(item)` for every item as a Ray task and returns the results in the order of `items`.

    A progress bar (`desc`) advances as tasks finish, in whatever order they finish. A task whose
    worker dies (process crash, node loss) is retried up to `max_retries` times; an exception raised
    by `fn` itself is not retried and is re-raised here after the remaining tasks are cancelled.
    `resources` are Ray task options: num_cpus, num_gpus, memory, resources.
    """
    import ray  # heavy: ray

    unknown = sorted(set(resources) - set(_RESOURCE_OPTIONS))
    if unknown:
        raise ValueError(f"map_parts: unknown resource option(s) {unknown}; use {list(_RESOURCE_OPTIONS)}")
    if max_retries < 0:
        raise ValueError(f"map_parts: max_retries must be non-negative, got {max_retries}")
    items = list(items)
    if not items:
        return []
    ensure_ray()
    remote_fn = ray.remote(fn).options(max_retries=max_retries, retry_exceptions=False, **resources)
    refs = [remote_fn.remote(item) for item in items]
    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, disable=not progress, unit="part") as bar:
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results[position[ref]] = ray.get(ref)
                    bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
    return results

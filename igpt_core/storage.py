"""Is a path shared by every node of the Ray cluster? Checked before a multi-node run writes to it.

Artifacts (palettes, shards) and Ray Train checkpoints are written by whichever node runs the work
and read by the others, so on a cluster of more than one node they must live on storage every node
sees: an object store URI (s3://, gs://, ...) or a shared filesystem (NFS, CephFS, Lustre, ...).
A node-local path silently "works" on the node that wrote it and breaks later, on another node, with
a missing-file error far from the cause; `check_shared_storage` turns that into one clear error up
front.

How: the driver writes a marker file with a random token under the path; a zero-CPU task pinned to
each alive node reads it back and writes a reply; the path is shared when every node saw the same
token and every reply is visible to the driver. Object store URIs are accepted without a probe (they
are shared by construction), and a user may assert that a path is shared with the
`IGPT_SHARED_STORAGE` environment variable (`1` for every path, or a list of path prefixes separated
by `os.pathsep`), e.g. when the probe cannot run.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igpt_core.distributed import ensure_ray

SHARED_ENV = "IGPT_SHARED_STORAGE"
"""Environment variable: `1`/`true` trusts every path; otherwise os.pathsep-separated path prefixes."""

SHARED_URI_SCHEMES = ("s3", "s3a", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "az", "wasb", "wasbs")
"""Object store and distributed filesystem URI schemes (pyarrow.fs / fsspec names) every node reaches."""

MARKER_PREFIX = ".igpt-shared-check-"


class StorageError(ValueError):
    """A path a multi-node run needs shared is not shared by every node; the message says which."""


@dataclass(frozen=True)
class NodeView:
    """What one node saw of the driver's marker file."""

    node_id: str
    hostname: str
    sees_marker: bool
    """The node read the marker with the driver's token (same file, same content)."""
    reply_seen: bool
    """The driver read the reply file this node wrote (the path is writable and shared both ways)."""
    error: str | None = None
    """Why the node could not check (path missing there, permission denied, node unreachable)."""

    @property
    def shared(self) -> bool:
        return self.sees_marker and self.reply_seen and self.error is None


@dataclass(frozen=True)
class StorageCheck:
    """The outcome of a shared-storage check."""

    path: str
    shared: bool
    reason: str
    """Why the path counts as shared (or why not): probed, object store URI, asserted, one node."""
    nodes: tuple[NodeView, ...] = field(default_factory=tuple)


def uri_scheme(path: str | os.PathLike[str]) -> str | None:
    """The URI scheme of `path` (`s3` for s3://bucket/x), or None for a plain filesystem path."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return None
    return scheme.lower()


def asserted_shared(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> bool:
    """True when IGPT_SHARED_STORAGE says `path` is shared (`1`/`true`, or a prefix of the path)."""
    value = (os.environ if env is None else env).get(SHARED_ENV, "").strip()
    if not value:
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    target = Path(os.fspath(path)).expanduser().absolute()
    for prefix in value.split(os.pathsep):
        if prefix and target.is_relative_to(Path(prefix).expanduser().absolute()):
            return True
    return False


def decide(path: str, views: list[NodeView]) -> StorageCheck:
    """The verdict from every node's view of the marker; raises StorageError naming the nodes that
    did not share the path."""
    if not views:
        raise ValueError("decide: no node views (the cluster reported no alive node)")
    missing = [view for view in views if not view.shared]
    if not missing:
        return StorageCheck(path, True, f"probed: all {len(views)} nodes see the same files", tuple(views))
    lines = []
    for view in missing:
        if view.error:
            what = view.error
        elif not view.sees_marker:
            what = "does not see the file the driver wrote there"
        else:
            what = "wrote a reply file there that the driver does not see"
        lines.append(f"  node {view.node_id[:12]} on {view.hostname}: {what}")
    raise StorageError(
        f"{path}: not shared by all {len(views)} nodes of the Ray cluster; a multi-node run writes "
        f"artifacts and checkpoints on one node and reads them on another.\n"
        + "\n".join(lines)
        + f"\nUse a path on a filesystem every node mounts (NFS, ...) or an object store URI "
        f"(s3://bucket/prefix, gs://...). If the path is shared and this check is wrong, set "
        f"{SHARED_ENV}={path} (docs/SCALING.md)."
    )


def check_shared_storage(
    path: str | os.PathLike[str],
    ray_address: str | None = None,
    *,
    timeout_s: float = 120.0,
) -> StorageCheck:
    """Checks that `path` is shared by every alive node of the Ray cluster at `ray_address`.

    Connects to Ray like the stages do (`distributed.ensure_ray`). Returns a StorageCheck when the
    path is shared (object store URI, asserted through IGPT_SHARED_STORAGE, a one-node cluster, or
    probed), raises StorageError when it is not. A local path is created if missing, and every file
    the probe writes is removed again.
    """
    text = os.fspath(path)
    if not text:
        raise ValueError("path: empty; give a directory or an object store URI")
    scheme = uri_scheme(text)
    if scheme in SHARED_URI_SCHEMES:
        return StorageCheck(text, True, f"{scheme}:// is an object store every node reaches")
    if scheme == "file":
        text = text[len("file://") :]
    elif scheme is not None:
        raise StorageError(
            f"{text}: unknown storage scheme {scheme!r}; use a filesystem path or one of "
            f"{', '.join(s + '://' for s in SHARED_URI_SCHEMES)}"
        )
    # Workers resolve a relative path against their own working directory: pin it here, once.
    local = Path(text).expanduser().absolute()
    if asserted_shared(local):
        return StorageCheck(str(local), True, f"asserted shared by {SHARED_ENV}")

    import ray  # heavy: ray

    ensure_ray(ray_address)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) <= 1:
        return StorageCheck(str(local), True, "one node: every path is shared")
    return decide(str(local), _probe(local, [node["NodeID"] for node in nodes], timeout_s))


def _probe(directory: Path, node_ids: list[str], timeout_s: float) -> list[NodeView]:
    """Writes the marker, asks each node to read it and reply, and collects what each one saw."""
    import ray  # heavy: ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"{directory}: cannot create the directory on the driver: {err}") from err
    token = secrets.token_hex(16)
    marker = directory / f"{MARKER_PREFIX}{token}"
    marker.write_text(token)
    read_marker = ray.remote(_read_marker_and_reply)
    try:
        refs = {
            node_id: read_marker.options(
                num_cpus=0,
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(str(marker), token, node_id)
            for node_id in node_ids
        }
        views = []
        for node_id, ref in refs.items():
            try:
                seen, hostname, error = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as err:
                seen, hostname, error = False, "?", f"the check task failed: {type(err).__name__}: {err}"
            reply = Path(f"{marker}.{node_id}")
            views.append(
                NodeView(node_id, hostname, seen, reply.is_file() and reply.read_text() == token, error)
            )
        return views
    finally:
        for leftover in directory.glob(f"{MARKER_PREFIX}{token}*"):
            leftover.unlink(missing_ok=True)


def _read_marker_and_reply(marker: str, token: str, node_id: str) -> tuple[bool, str, str | None]:
    """Runs on one node: does it see the marker with `token`? Leaves a reply for the driver to see."""
    hostname = socket.gethostname()
    try:
        seen = Path(marker).read_text() == token
    except FileNotFoundError:
        return False, hostname, None
    except OSError as err:
        return False, hostname, f"cannot read {marker}: {err}"
    try:
        Path(f"{marker}.{node_id}").write_text(token)
    except OSError as err:
        return seen, hostname, f"cannot write next to {marker}: {err}"
    return seen, hostname, None


def describe(check: StorageCheck) -> dict[str, Any]:
    """A JSON-ready summary (for logs and run metadata)."""
    return {
        "path": check.path,
        "shared": check.shared,
        "reason": check.reason,
        "nodes": [
            {"node_id": view.node_id, "hostname": view.hostname, "shared": view.shared}
            for view in check.nodes
        ],
    }

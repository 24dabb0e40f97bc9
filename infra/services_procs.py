"""Process bookkeeping for infra/up.sh and infra/down.sh (Linux /proc; standard library only).

A started service is recorded as `name pid starttime` (start time in clock ticks since boot, field 22
of /proc/<pid>/stat) so that a pid the kernel later reuses for an unrelated process is never touched.
Each service runs in its own session (`session`), so its pid is also its process-group id and the
group holds the service's own helpers (the MLflow server's uvicorn, job runner and huey consumers).

How each service stops (Prefect 3.9, MLflow 3.17; measured in docs/PIPELINE.md):
- `prefect server start` runs uvicorn in-process: SIGTERM is a graceful shutdown.
- `prefect worker start` turns SIGTERM into a SIGINT to itself, which asyncio turns into cancelling the
  worker; a second SIGTERM makes it SIGKILL itself, so it gets exactly one. This only works when the
  worker did not inherit SIGINT ignored -- which is what a non-interactive shell's `cmd &` hands its
  background children, and why `session` restores the default dispositions before exec. Its flow runs
  run in sessions of their own (Prefect isolates them), outside the group.
- `mlflow server` forwards SIGTERM to its uvicorn; its job runner dies on SIGTERM (no handler) and each
  huey consumer takes SIGTERM as "stop now". SIGTERM to the group reaches them all at once.
`stop` takes them one at a time, newest first, so that the worker stops while the API it reports to
still answers. A process that has exited is gone for our purposes even while it waits to be reaped (state Z): the
services' parent, up.sh, has exited, so init (or the nearest subreaper) reaps them, in its own time.

    services_procs.py session CMD [ARG...]        exec CMD as a session leader with default signals
    services_procs.py start-time PID              print the pid's start time (fails if it is gone)
    services_procs.py wait-http URL PID SECONDS   wait until URL answers 200 while PID lives
    services_procs.py port-free PORT              exit 1 when something listens on 127.0.0.1:PORT
    services_procs.py stop PIDFILE SECONDS        stop the recorded services; exit 1 if any is left
    services_procs.py alive PIDFILE               print the recorded services that still run
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

# Dispositions a child must not inherit: a non-interactive shell ignores SIGINT and SIGQUIT for `cmd &`,
# and a Python parent ignores SIGPIPE and SIGXFSZ (subprocess's restore_signals resets those two).
RESET_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGXFSZ)
# After SIGKILL a process still has to tear down (threads, memory); it cannot refuse, so this only
# bounds a wait on the kernel.
KILL_WAIT_S = 30.0
POLL_S = 0.2  # polling for exit: there is no way to wait on a process that is not our child


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    if fields[0] == "Z":
        return None
    return int(fields[19])


def read_pidfile(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            entries.append((parts[0], int(parts[1]), int(parts[2])))
    return entries


def is_ours(pid: int, started: int) -> bool:
    return start_time(pid) == started


def group_members(pgid: int, started: int) -> list[int]:
    """Live processes of the recorded service's process group (the service and its helpers).

    The kernel does not hand out a pid that still names a process group, so group `pgid` is the
    recorded one while its leader is ours or gone; when the pid runs something else, it is not ours.
    """
    leader = start_time(pgid)
    if leader is not None and leader != started:
        return []
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) == pgid and start_time(pid) is not None:
                members.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def left_running(entries: Iterable[tuple[str, int, int]]) -> dict[str, list[int]]:
    """name -> live pids of each recorded service that still has any."""
    left = {}
    for name, pid, started in entries:
        members = group_members(pid, started)
        if members:
            left[name] = members
    return left


def wait_gone(pid: int, started: int, deadline: float) -> bool:
    """Polls until the service's group is empty or the monotonic `deadline` passes; True when empty."""
    while group_members(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def stop_one(name: str, pid: int, started: int, seconds: float) -> bool:
    """SIGTERM the service's group once, SIGKILL what is left after `seconds`, and wait for it to be gone.
    True when nothing of it is left running."""
    print(f"stopping {name} (pid {pid}): SIGTERM")
    since = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if wait_gone(pid, started, since + seconds):
        print(f"{name} stopped on SIGTERM in {time.monotonic() - since:.1f}s")
        return True
    left = group_members(pid, started)
    print(f"{name}: {len(left)} process(es) still running {seconds:.0f}s after SIGTERM; SIGKILL {left}")
    for member in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    if wait_gone(pid, started, time.monotonic() + KILL_WAIT_S):
        print(f"{name} stopped after SIGKILL in {time.monotonic() - since:.1f}s")
        return True
    print(f"{name}: still running {group_members(pid, started)}", file=sys.stderr)
    return False


def stop(pidfile: Path, seconds: float) -> int:
    """Stops the recorded services one at a time, newest first: the worker while the Prefect API it
    reports to still answers, the servers after it. 0 when nothing recorded is left running."""
    entries = [e for e in read_pidfile(pidfile) if group_members(e[1], e[2])]
    stopped = [stop_one(name, pid, started, seconds) for name, pid, started in reversed(entries)]
    return 0 if all(stopped) else 1


def session(command: list[str]) -> int:
    """Replaces this process by `command` as the leader of a new session, default signals restored."""
    if not command:
        print("services_procs.py session: no command", file=sys.stderr)
        return 2
    os.setsid()  # fails (EPERM) rather than fork when already a group leader: the pid must stay ours
    for signum in RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    os.execvp(command[0], command)


def wait_http(url: str, pid: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            print(f"{url}: the process (pid {pid}) exited before answering", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)  # polling a server that is still starting
    print(f"{url}: no answer within {seconds:.0f}s", file=sys.stderr)
    return 1


def port_free(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "session":
        return session(args)
    if command == "start-time":
        started = start_time(int(args[0]))
        if started is None:
            return 1
        print(started)
        return 0
    if command == "wait-http":
        return wait_http(args[0], int(args[1]), float(args[2]))
    if command == "port-free":
        return port_free(int(args[0]))
    if command == "stop":
        return stop(Path(args[0]), float(args[1]))
    if command == "alive":
        for name, pids in left_running(read_pidfile(Path(args[0]))).items():
            print(f"{name} {' '.join(map(str, pids))}")
        return 0
    print(f"services_procs.py: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Process bookkeeping for infra/up.sh and infra/down.sh (Linux /proc; standard library only).

A started service is recorded as `name pid starttime` (start time in clock ticks since boot, field 22
of /proc/<pid>/stat) so that a pid the kernel later reuses for an unrelated process is never touched.
Each service runs under `setsid`, so its pid is also its process-group id and stopping the group stops
the service's own children (uvicorn workers, flow-run subprocesses) with it.

    services_procs.py start-time PID              print the pid's start time (fails if it is gone)
    services_procs.py wait-http URL PID SECONDS   wait until URL answers 200 while PID lives
    services_procs.py port-free PORT              exit 1 when something listens on 127.0.0.1:PORT
    services_procs.py stop PIDFILE SECONDS        stop every recorded live service, newest first
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
from pathlib import Path


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


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (the service and the children it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and start_time(int(entry.name)) is not None:
                members.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return members


def stop(pidfile: Path, seconds: float) -> int:
    """SIGTERM each recorded service's group (newest first), SIGKILL what is left after `seconds`."""
    entries = [e for e in read_pidfile(pidfile) if is_ours(e[1], e[2])]
    for name, pid, _ in reversed(entries):
        print(f"stopping {name} (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(group_members(pid) for _, pid, _ in entries):
        time.sleep(0.2)  # polling for exit; there is no portable way to wait on a non-child
    for name, pid, _ in entries:
        left = group_members(pid)
        if left:
            print(f"{name}: {len(left)} process(es) ignored SIGTERM; sending SIGKILL")
            for member in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
    return 0


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
        for name, pid, started in read_pidfile(Path(args[0])):
            if is_ours(pid, started):
                print(f"{name} {pid}")
        return 0
    print(f"services_procs.py: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

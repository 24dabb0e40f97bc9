"""Process bookkeeping for ray_up.sh / ray_down.sh, from /proc (Linux).

A process is recorded as `pid:starttime` (start time in clock ticks since boot, field 22 of
/proc/<pid>/stat), so a pid the kernel later hands to an unrelated process is never mistaken for
ours.

    ray_pids.py tree PID...          the given pids, their descendants and the members of the sessions
                                     they lead (children orphaned by a dead parent), as pid:starttime
    ray_pids.py alive PID:START...   those of the given entries that still run (same start time)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat, or None when the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return fields


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it no longer exists."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def session_members(leaders: list[int]) -> list[int]:
    """Live processes whose session id is one of `leaders` (ray_up.sh starts each node with setsid)."""
    wanted = set(leaders)
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[3]) in wanted:
                members.append(int(name))
    return sorted(members)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from every thread's children list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        found.extend(int(child) for child in text.split())
    return found


def tree(roots: list[int]) -> list[str]:
    """`pid:starttime` for the roots, every live descendant and the roots' session members, roots first."""
    seen: dict[int, int] = {}
    stack = list(reversed(roots + session_members(roots)))
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        started = start_time(pid)
        if started is None:
            continue
        seen[pid] = started
        stack.extend(reversed(children(pid)))
    return [f"{pid}:{started}" for pid, started in seen.items()]


def alive(entries: list[str]) -> list[str]:
    """The `pid:starttime` entries whose process still runs and is the same process."""
    live = []
    for entry in entries:
        pid, _, started = entry.partition(":")
        if not pid.isdigit() or not started.isdigit():
            raise ValueError(f"entry {entry!r} is not pid:starttime")
        if start_time(int(pid)) == int(started):
            live.append(entry)
    return live


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("tree", "alive"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "tree":
        if not all(arg.isdigit() for arg in argv[1:]):
            print(f"ray_pids.py tree: pids must be integers, got {argv[1:]}", file=sys.stderr)
            return 2
        print(" ".join(tree([int(arg) for arg in argv[1:]])))
    else:
        print(" ".join(alive(argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

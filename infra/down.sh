#!/usr/bin/env bash
# Stops the services infra/up.sh started (`make down`): exactly the processes recorded in
# $IGPT_SERVICES_STATE/services.pids (default $IGPT_HOME/services), each with its process group, checked
# by pid and start time so that a reused pid is never signalled. Nothing is stopped by name. Exits 0
# when none of them is left running.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
IGPT_HOME="${IGPT_HOME:-$REPO/igpt-home}"
STATE="${IGPT_SERVICES_STATE:-$IGPT_HOME/services}"
PIDFILE="$STATE/services.pids"
if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi

if [[ ! -s "$PIDFILE" ]]; then
    echo "down.sh: no services recorded in $PIDFILE; nothing to stop"
    exit 0
fi
# Each service gets SIGTERM once (its own graceful stop) and IGPT_SERVICES_STOP_S seconds (generous: the
# MLflow group's huey consumers took up to 21 s to exit on a loaded 2-core machine); what is left then
# gets SIGKILL, and the verdict waits until the killed processes are gone (a zombie is gone).
"$PY" "$HERE/services_procs.py" stop "$PIDFILE" "${IGPT_SERVICES_STOP_S:-60}" || true
left="$("$PY" "$HERE/services_procs.py" alive "$PIDFILE")"
if [[ -n "$left" ]]; then
    echo "down.sh: still running (name pids): $left" >&2
    exit 1
fi
echo "igpt services stopped"

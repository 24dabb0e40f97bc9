#!/usr/bin/env bash
# Stops the two-node cluster that infra/ray_up.sh started, and nothing else: the processes recorded
# in DIR/cluster.env (pid + start time) plus whatever those processes spawned since (their
# descendants and the members of the sessions they lead). Never `ray stop`, which would stop every
# Ray on the machine.
#
#   infra/ray_down.sh [--state DIR] [--keep-logs] [--grace S]
#
# SIGTERM first (each `ray start --block` then drains its node and stops its raylet, GCS and
# workers), SIGKILL for whatever is left after the grace period. Exits non-zero if any of our
# processes survives.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
STATE="${IGPT_RAY_STATE:-${IGPT_HOME:-$REPO/igpt-home}/ray-cluster}"
KEEP_LOGS=0
GRACE_S=20

while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) STATE="$2"; shift 2 ;;
        --keep-logs) KEEP_LOGS=1; shift ;;
        --grace) GRACE_S="$2"; shift 2 ;;
        -h|--help) sed -n '7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "ray_down.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[[ "$GRACE_S" =~ ^[0-9]+$ ]] || { echo "ray_down.sh: --grace must be whole seconds, got '$GRACE_S'" >&2; exit 2; }

ENV_FILE="$STATE/cluster.env"
if [[ ! -f "$ENV_FILE" ]]; then
    echo "ray_down.sh: no $ENV_FILE: nothing recorded to stop" >&2
    exit 0
fi
PY="$REPO/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

# shellcheck disable=SC1090
source "$ENV_FILE"
read -r -a RECORDED <<<"$IGPT_RAY_PIDS"

# Only roots that are still the processes we started (same start time) count: their descendants and
# session members now, plus everything recorded at start-up that still runs.
read -r -a LIVE_ROOTS <<<"$("$PY" "$HERE/ray_pids.py" alive "${RECORDED[@]}")"
roots=()
for entry in "${LIVE_ROOTS[@]}"; do
    pid="${entry%%:*}"
    if [[ "$pid" == "$IGPT_RAY_HEAD_PID" || "$pid" == "$IGPT_RAY_WORKER_PID" ]]; then
        roots+=("$pid")
    fi
done
current=()
if ((${#roots[@]})); then
    read -r -a current <<<"$("$PY" "$HERE/ray_pids.py" tree "${roots[@]}")"
fi
read -r -a targets <<<"$(printf '%s\n' "${RECORDED[@]}" "${current[@]}" | sort -u | tr '\n' ' ')"

still_alive() { "$PY" "$HERE/ray_pids.py" alive "${targets[@]}"; }

# The worker node first, so the head does not spend the grace period waiting on a node it is losing.
for pid in "$IGPT_RAY_WORKER_PID" "$IGPT_RAY_HEAD_PID"; do
    for root in "${roots[@]}"; do
        [[ "$root" == "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
    done
done

waited=0
while [[ -n "$(still_alive)" ]] && ((waited < GRACE_S * 10)); do
    sleep 0.1  # polling /proc for our processes to exit; a non-child cannot be wait()ed for
    waited=$((waited + 1))
done

left="$(still_alive)"
if [[ -n "$left" ]]; then
    echo "ray_down.sh: after ${GRACE_S}s still running, sending SIGKILL: $left" >&2
    for entry in $left; do kill -KILL "${entry%%:*}" 2>/dev/null || true; done
    waited=0
    while [[ -n "$(still_alive)" ]] && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
fi

left="$(still_alive)"
if [[ -n "$left" ]]; then
    echo "ray_down.sh: could not stop: $left" >&2
    exit 1
fi
rm -f "$ENV_FILE"
if ((KEEP_LOGS == 0)) && [[ "$IGPT_RAY_TEMP_DIR" == /tmp/igray-* ]]; then
    rm -rf "$IGPT_RAY_TEMP_DIR"
fi
echo "ray_down.sh: stopped ${#targets[@]} processes of the cluster at $RAY_ADDRESS"

#!/usr/bin/env bash
# Starts a two-node Ray cluster on this machine: a head node and one worker node joined with
# `ray start --address`, each on its own free ports and its own temp dir, so it runs beside other
# Ray instances (yours or other users') without touching them. It is how igpt tests multi-node code
# on one machine; on real machines run the same two `ray start` lines on different hosts.
#
#   infra/ray_up.sh [--state DIR] [--head-cpus N] [--worker-cpus N] [--object-store-mb MB]
#                   [--worker-private-dir DIR]
#
# Prints `RAY_ADDRESS=127.0.0.1:<port>` (and the dashboard URL) on stdout and writes DIR/cluster.env:
# the address and the pid + start time of every process it started, which infra/ray_down.sh stops.
# Each node runs `ray start --block` in its own session, so its pid owns the node's raylet, GCS and
# workers; nothing here ever runs `ray stop` (that would stop every Ray on the machine).
#
# --worker-private-dir DIR starts the worker node in its own mount namespace with an empty tmpfs
# over DIR: DIR is then node-local storage as on a real second machine (the head and every driver see
# the host's DIR, the worker node sees its own), which is how the tests exercise the shared-storage
# check on one machine. It needs root or unprivileged user namespaces (`unshare`).
#
# Environment: IGPT_RAY_BIN (the `ray` executable; default .venv/bin/ray, else ray on PATH),
# IGPT_RAY_START_ATTEMPTS (default 3: a node that fails to come up restarts the whole cluster on new
# ports), IGPT_RAY_READY_TIMEOUT_S (default 180: how long one node may take to say it started).
#
# Token auth: Ray 2.60 enables token auth for a new local cluster whenever ~/.ray/auth_token exists,
# and a second node or a driver then needs the token. This cluster runs with RAY_AUTH_MODE=disabled
# on every node; every driver that connects must set RAY_AUTH_MODE=disabled too (cluster.env has it).
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
STATE="${IGPT_RAY_STATE:-${IGPT_HOME:-$REPO/igpt-home}/ray-cluster}"
HEAD_CPUS=1
WORKER_CPUS=1
OBJECT_STORE_MB=256
PRIVATE_DIR=""
READY_TIMEOUT_S="${IGPT_RAY_READY_TIMEOUT_S:-180}"

usage() { sed -n '7,8p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --state) STATE="$2"; shift 2 ;;
        --head-cpus) HEAD_CPUS="$2"; shift 2 ;;
        --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
        --object-store-mb) OBJECT_STORE_MB="$2"; shift 2 ;;
        --worker-private-dir) PRIVATE_DIR="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "ray_up.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for pair in "head-cpus:$HEAD_CPUS" "worker-cpus:$WORKER_CPUS" "object-store-mb:$OBJECT_STORE_MB"; do
    if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
        echo "ray_up.sh: --${pair%%:*} must be a non-negative integer, got '${pair#*:}'" >&2
        exit 2
    fi
done

if [[ -n "${IGPT_RAY_BIN:-}" ]]; then
    RAY="$IGPT_RAY_BIN"
    PY="$(command -v python3 || true)"
    [[ -x "$REPO/.venv/bin/python" ]] && PY="$REPO/.venv/bin/python"
elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
    PY="$REPO/.venv/bin/python"
else
    RAY="$(command -v ray || true)"
    PY="$(command -v python3 || true)"
fi
[[ -n "$RAY" ]] || { echo "ray_up.sh: no 'ray' executable (.venv/bin/ray or on PATH)" >&2; exit 1; }

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
if [[ -f "$STATE/cluster.env" ]]; then
    echo "ray_up.sh: $STATE/cluster.env exists: a cluster from this state dir may still run;" \
        "stop it with infra/ray_down.sh --state $STATE first" >&2
    exit 1
fi

export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
# On SIGTERM a node first drains for up to 30 s, waiting for its worker leases to come back (meant for
# Ray Serve replicas on Kubernetes). igpt has no Serve, and ray_down.sh wants a prompt stop.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

# A node's `ray start` gives its raylet a fixed 30 s to register with the GCS and exits if it has not;
# on a loaded machine (two cores busy with other work) that can miss. A failed attempt is stopped,
# its logs are shown, and the whole cluster is started again on new ports and a new temp dir.
ATTEMPTS="${IGPT_RAY_START_ATTEMPTS:-3}"
[[ "$ATTEMPTS" =~ ^[1-9][0-9]*$ ]] || {
    echo "ray_up.sh: IGPT_RAY_START_ATTEMPTS must be a positive integer, got '$ATTEMPTS'" >&2
    exit 2
}

STORE_BYTES=$((OBJECT_STORE_MB * 1024 * 1024))
COMMON=(--node-ip-address=127.0.0.1 --min-worker-port=0 --max-worker-port=0
    --object-store-memory="$STORE_BYTES" --disable-usage-stats --block)

started=()
stop_started() {  # every process group this attempt started: SIGTERM, then SIGKILL after 15 s
    local pid waited=0
    for pid in "${started[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${started[@]}"; do
        while kill -0 -- "-$pid" 2>/dev/null && ((waited < 150)); do
            sleep 0.1  # waiting for a process group we signalled to exit; nothing to block on
            waited=$((waited + 1))
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    started=()
}
show_logs() {  # the last lines of the Ray logs that say why a node did not come up
    local file
    for file in "$TEMP_ROOT"/*/session_latest/logs/{raylet,gcs_server}.{err,out}; do
        [[ -s "$file" ]] || continue
        echo "--- $file (last 15 lines)" >&2
        tail -n 15 "$file" >&2
    done
}
trap 'echo "ray_up.sh: start failed; stopping what it started" >&2; stop_started; rm -f "$STATE/cluster.env"' ERR

wait_started() {  # log file, pid, what: until `ray start` says the node is up, or it died
    local log="$1" pid="$2" what="$3" waited=0
    until grep -q "Ray runtime started" "$log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "ray_up.sh: the $what node exited while starting; its output:" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        if ((waited >= READY_TIMEOUT_S * 10)); then
            echo "ray_up.sh: the $what node did not start within ${READY_TIMEOUT_S}s ($log)" >&2
            return 1
        fi
        sleep 0.1  # polling a log file for the ready line; there is nothing to block on
        waited=$((waited + 1))
    done
}

start_nodes() {  # one attempt: fresh ports and temp dir, the head, then the worker; 1 if a node failed
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes: keep it short.
    TEMP_ROOT="$(mktemp -d /tmp/igray-XXXXXX)"
    mkdir -p "$TEMP_ROOT/h" "$TEMP_ROOT/w"

    # Ports: Ray's defaults (8265, 10001, 52365, ...) are fixed numbers another Ray on this machine may
    # hold; ask the kernel for free ones. ray_ports.py holds them all until printing, so they are distinct.
    read -r GCS_PORT DASH_PORT CLIENT_PORT \
        H_AGENT_HTTP H_AGENT_GRPC H_RUNTIME_ENV H_METRICS \
        W_AGENT_HTTP W_AGENT_GRPC W_RUNTIME_ENV W_METRICS < <("$PY" "$HERE/ray_ports.py" 11)

    # setsid: each node's `ray start --block` leads its own session and process group, so it and every
    # process it spawns can be found (and stopped) by that one pid and nothing else.
    setsid "$RAY" start --head --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" \
        --resources='{"node_head": 1}' \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
        --ray-client-server-port="$CLIENT_PORT" \
        --dashboard-agent-listen-port="$H_AGENT_HTTP" --dashboard-agent-grpc-port="$H_AGENT_GRPC" \
        --runtime-env-agent-port="$H_RUNTIME_ENV" --metrics-export-port="$H_METRICS" \
        --temp-dir="$TEMP_ROOT/h" "${COMMON[@]}" >"$STATE/head.log" 2>&1 </dev/null &
    HEAD_PID=$!
    started+=("$HEAD_PID")
    wait_started "$STATE/head.log" "$HEAD_PID" head || return 1

    # The worker node's command prefix: nothing, or a private mount namespace with DIR over tmpfs.
    # unshare and sh exec in place, so $! below is still the `ray start` process itself.
    local isolate=() userns=()
    if [[ -n "$PRIVATE_DIR" ]]; then
        if [[ "$(id -u)" != 0 ]]; then userns=(--user --map-root-user); fi
        isolate=(unshare "${userns[@]}" --mount --propagation private --
            sh -c 'mount -t tmpfs igpt-node-local "$0" && exec "$@"' "$PRIVATE_DIR")
    fi

    setsid "${isolate[@]}" "$RAY" start --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS" \
        --resources='{"node_worker": 1}' \
        --dashboard-agent-listen-port="$W_AGENT_HTTP" --dashboard-agent-grpc-port="$W_AGENT_GRPC" \
        --runtime-env-agent-port="$W_RUNTIME_ENV" --metrics-export-port="$W_METRICS" \
        --temp-dir="$TEMP_ROOT/w" "${COMMON[@]}" >"$STATE/worker.log" 2>&1 </dev/null &
    WORKER_PID=$!
    started+=("$WORKER_PID")
    wait_started "$STATE/worker.log" "$WORKER_PID" worker || return 1
}

if [[ -n "$PRIVATE_DIR" ]]; then
    mkdir -p "$PRIVATE_DIR"
    PRIVATE_DIR="$(cd "$PRIVATE_DIR" && pwd)"
fi
attempt=1
until start_nodes; do
    show_logs
    stop_started
    if ((attempt >= ATTEMPTS)); then
        echo "ray_up.sh: the cluster did not start in $ATTEMPTS attempts (logs: /tmp/igray-*/*/session_latest/logs)" >&2
        rm -f "$STATE/cluster.env"
        exit 1
    fi
    echo "ray_up.sh: attempt $attempt of $ATTEMPTS failed (logs: $TEMP_ROOT); starting again" >&2
    attempt=$((attempt + 1))
done

# Record every process the two sessions hold now, with its start time, so ray_down.sh can tell our
# processes from unrelated ones that later reuse a pid.
PIDS="$("$PY" "$HERE/ray_pids.py" tree "$HEAD_PID" "$WORKER_PID")"

cat >"$STATE/cluster.env.tmp" <<EOF
RAY_ADDRESS=127.0.0.1:$GCS_PORT
RAY_AUTH_MODE=disabled
RAY_DASHBOARD_URL=http://127.0.0.1:$DASH_PORT
IGPT_RAY_HEAD_PID=$HEAD_PID
IGPT_RAY_WORKER_PID=$WORKER_PID
IGPT_RAY_TEMP_DIR=$TEMP_ROOT
IGPT_RAY_WORKER_PRIVATE_DIR=$PRIVATE_DIR
IGPT_RAY_PIDS="$PIDS"
EOF
mv "$STATE/cluster.env.tmp" "$STATE/cluster.env"
trap - ERR

echo "RAY_ADDRESS=127.0.0.1:$GCS_PORT"
echo "RAY_DASHBOARD_URL=http://127.0.0.1:$DASH_PORT"
echo "# drivers: export RAY_ADDRESS=127.0.0.1:$GCS_PORT RAY_AUTH_MODE=disabled" >&2
echo "# stop:    $HERE/ray_down.sh --state $STATE" >&2

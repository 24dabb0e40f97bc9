#!/usr/bin/env bash
# Starts the igpt services on 127.0.0.1 and deploys the flows (`make up`):
#   - a Prefect server (SQLite database in the workspace)   http://127.0.0.1:$IGPT_PREFECT_PORT/api (4200)
#   - an MLflow tracking server (SQLite + artifact folder)   http://127.0.0.1:$IGPT_MLFLOW_PORT      (5000)
#   - a Prefect process worker polling the `process` work pool
# then runs `prefect deploy --all` (prefect.yaml) so `prefect deployment run igpt/full-pipeline` works.
#
# Environment: IGPT_HOME (workspace, default <repo>/igpt-home), IGPT_PREFECT_PORT, IGPT_MLFLOW_PORT,
# IGPT_SERVICES_STATE (default $IGPT_HOME/services), IGPT_SERVICES_TIMEOUT_S (readiness, default 180),
# PREFECT_HOME (default $IGPT_SERVICES_STATE/prefect-home).
#
# Writes $IGPT_SERVICES_STATE/services.pids (`name pid starttime` per started process; infra/down.sh
# stops exactly those) and services.env (PREFECT_API_URL, MLFLOW_TRACKING_URI, IGPT_HOME: `source` it
# in a shell to talk to these services). Logs go to $IGPT_SERVICES_STATE/*.log.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
export IGPT_HOME="$(mkdir -p "${IGPT_HOME:-$REPO/igpt-home}" && cd "${IGPT_HOME:-$REPO/igpt-home}" && pwd)"
STATE="${IGPT_SERVICES_STATE:-$IGPT_HOME/services}"
PREFECT_PORT="${IGPT_PREFECT_PORT:-4200}"
MLFLOW_PORT="${IGPT_MLFLOW_PORT:-5000}"
TIMEOUT_S="${IGPT_SERVICES_TIMEOUT_S:-180}"
HOST=127.0.0.1

if [[ -x "$REPO/.venv/bin/prefect" ]]; then BIN="$REPO/.venv/bin"; else BIN="$(dirname "$(command -v prefect)")"; fi
PY="$BIN/python"
[[ -x "$BIN/prefect" && -x "$BIN/mlflow" ]] || { echo "up.sh: prefect/mlflow not found (run make install)" >&2; exit 1; }
PROCS=("$PY" "$HERE/services_procs.py")

mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/services.pids"
if [[ -s "$PIDFILE" ]] && [[ -n "$("${PROCS[@]}" alive "$PIDFILE")" ]]; then
    echo "up.sh: services from $PIDFILE are still running:" >&2
    "${PROCS[@]}" alive "$PIDFILE" >&2
    echo "up.sh: run infra/down.sh first" >&2
    exit 1
fi
: > "$PIDFILE"
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
    if ! "${PROCS[@]}" port-free "$port"; then
        echo "up.sh: port $port on $HOST is taken; set IGPT_PREFECT_PORT / IGPT_MLFLOW_PORT" >&2
        exit 1
    fi
done

export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
export MLFLOW_ENABLE_TELEMETRY=false
export PREFECT_HOME="${PREFECT_HOME:-$STATE/prefect-home}"
export PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"
export IGPT_REPO="$REPO"

cleanup_on_error() {
    echo "up.sh: failed; stopping what was started (logs in $STATE)" >&2
    "${PROCS[@]}" stop "$PIDFILE" 30 >&2 || true
}
trap cleanup_on_error ERR

# Starts "$@" in its own session (so down.sh can stop its whole process group) and records it. Not
# `setsid "$@" &`: a background command of this non-interactive shell starts with SIGINT ignored, and
# the Prefect worker's SIGTERM handler stops it by sending itself SIGINT (it then never stopped).
start() {
    local name="$1"; shift
    "${PROCS[@]}" session "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
    local pid=$!
    local started
    started="$("${PROCS[@]}" start-time "$pid")" || { echo "up.sh: $name exited at once:" >&2; tail -20 "$STATE/$name.log" >&2; return 1; }
    echo "$name $pid $started" >> "$PIDFILE"
    LAST_PID=$pid
}

echo "starting Prefect server on $PREFECT_API_URL"
PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE/prefect.db" \
    start prefect-server "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
PREFECT_PID=$LAST_PID

echo "starting MLflow server on $MLFLOW_TRACKING_URI"
mkdir -p "$IGPT_HOME/mlartifacts"
start mlflow-server "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$IGPT_HOME/mlflow.db" \
    --artifacts-destination "$IGPT_HOME/mlartifacts" --serve-artifacts
MLFLOW_PID=$LAST_PID

"${PROCS[@]}" wait-http "$PREFECT_API_URL/health" "$PREFECT_PID" "$TIMEOUT_S" || { tail -30 "$STATE/prefect-server.log" >&2; false; }
"${PROCS[@]}" wait-http "$MLFLOW_TRACKING_URI/health" "$MLFLOW_PID" "$TIMEOUT_S" || { tail -30 "$STATE/mlflow-server.log" >&2; false; }

if ! "$BIN/prefect" work-pool inspect process > /dev/null 2>&1; then
    "$BIN/prefect" work-pool create process --type process > "$STATE/work-pool.log" 2>&1 \
        || { cat "$STATE/work-pool.log" >&2; false; }
fi

echo "starting a process worker on pool 'process'"
start prefect-worker "$BIN/prefect" worker start --pool process --type process --name "igpt-worker-$PREFECT_PORT"

echo "deploying prefect.yaml"
(cd "$REPO" && "$BIN/prefect" --no-prompt deploy --all) > "$STATE/deploy.log" 2>&1 \
    || { tail -40 "$STATE/deploy.log" >&2; false; }
grep -E "Deployment '.*' successfully created" "$STATE/deploy.log" || true

cat > "$STATE/services.env" <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export IGPT_HOME=$IGPT_HOME
EOF
trap - ERR
cat <<EOF
igpt services are up (pids in $PIDFILE, logs in $STATE):
  Prefect API/UI  $PREFECT_API_URL  (UI: http://$HOST:$PREFECT_PORT)
  MLflow          $MLFLOW_TRACKING_URI
  worker          pool 'process'
Run the pipeline:  source $STATE/services.env && prefect deployment run igpt/full-pipeline --watch
Stop everything:   make down   (infra/down.sh)
EOF

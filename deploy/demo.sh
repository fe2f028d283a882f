#!/usr/bin/env bash
# The Maia demo: a controller on a throwaway SQLite database with authentication on, 64 simulated
# nodes (4 racks x 16), the example topology, tenants and deployments; waits until every
# deployment runs, prints where every shard landed, the cluster summary and one tenant's view,
# then shuts everything down. The bootstrap admin token is in .run/demo-*/admin.token.
#
#   bash deploy/demo.sh                  # run and stop (exit 0 only if everything ran)
#   bash deploy/demo.sh --keep-running   # leave it up until Ctrl-C, to try maiactl by hand
#
# Logs go to .run/demo-<timestamp>/ (printed at start). Override the interpreter's venv with
# VENV=/path/to/venv; WAIT_TIMEOUT (seconds, default 180) bounds the wait for Running;
# CONTROLLER_ARGS adds flags to maia-controller.
set -euo pipefail

KEEP_RUNNING=0
for arg in "$@"; do
  case "$arg" in
    --keep-running) KEEP_RUNNING=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
BIN="$VENV/bin"
EXAMPLES="$ROOT/deploy/examples"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-180}"
RACKS=4
NODES_PER_RACK=16
RUN_DIR="$ROOT/.run/demo-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUN_DIR"
DB="$RUN_DIR/maia.db"
ADMIN_TOKEN_FILE="$RUN_DIR/admin.token"

CONTROLLER_PID=""
SIMNODE_PID=""
STATUS=0

say() { printf '\n==> %s\n' "$*"; }
fail() { echo "demo: $*" >&2; STATUS=1; exit 1; }

# Stop children in reverse order: nodes first (they close their streams), then the controller.
stop_pid() {  # name pid
  local name="$1" pid="$2" i
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "demo: $name did not stop in 10s, killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    STATUS=1
  fi
  local rc=0
  wait "$pid" 2>/dev/null || rc=$?
  if [[ $rc -ne 0 && $rc -ne 143 ]]; then
    echo "demo: $name exited with status $rc (see $RUN_DIR)" >&2
    STATUS=1
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ $rc -ne 0 ]] && STATUS=$rc
  say "shutting down"
  stop_pid maia-simnode "$SIMNODE_PID"
  stop_pid maia-controller "$CONTROLLER_PID"
  if [[ $STATUS -eq 0 ]]; then
    echo "demo finished OK; logs in $RUN_DIR"
  else
    echo "demo FAILED (status $STATUS); logs in $RUN_DIR" >&2
    for log in controller.log simnode.log; do
      [[ -s "$RUN_DIR/$log" ]] && { echo "--- last lines of $log:" >&2; tail -n 15 "$RUN_DIR/$log" >&2; }
    done
  fi
  exit "$STATUS"
}
trap cleanup EXIT
READY=0
trap 'if [[ $READY -eq 1 ]]; then exit 0; else exit 130; fi' INT TERM

maiactl() { "$BIN/maiactl" --controller "$ADDRESS" "$@"; }

echo "Maia demo: logs in $RUN_DIR"

say "starting maia-controller (SQLite $DB)"
# shellcheck disable=SC2086  # CONTROLLER_ARGS is a list of extra flags
"$BIN/maia-controller" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --db "sqlite+aiosqlite:///$DB" --bootstrap-admin-token-file "$ADMIN_TOKEN_FILE" ${CONTROLLER_ARGS:-} \
  >"$RUN_DIR/controller.out" 2>"$RUN_DIR/controller.log" &
CONTROLLER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do
  ADDRESS="$(sed -n 's/^maia-controller listening on //p' "$RUN_DIR/controller.out" | head -n1)"
  [[ -n "$ADDRESS" ]] && break
  kill -0 "$CONTROLLER_PID" 2>/dev/null || fail "maia-controller exited during start-up"
  sleep 0.2
done
[[ -n "$ADDRESS" ]] || fail "maia-controller did not report its address in 60s"
MAIA_TOKEN="$(cat "$ADMIN_TOKEN_FILE")"
export MAIA_TOKEN
for _ in $(seq 1 100); do
  maiactl summary >/dev/null 2>&1 && break
  sleep 0.2
done
maiactl summary >/dev/null || fail "maia-controller at $ADDRESS does not answer"
METRICS_URL="$(sed -n 's/^maia-controller metrics on //p' "$RUN_DIR/controller.out" | head -n1)"
[[ -n "$METRICS_URL" ]] || fail "maia-controller did not report its metrics URL"
CONSOLE_URL="$(sed -n 's/^maia-controller console on //p' "$RUN_DIR/controller.out" | head -n1)"
[[ -n "$CONSOLE_URL" ]] || fail "maia-controller did not report its console URL"
echo "controller listening on $ADDRESS"
echo "console:  $CONSOLE_URL"
echo "metrics:  $METRICS_URL"
echo "$ADDRESS" >"$RUN_DIR/address"

say "maiactl apply -f topology.yaml"
maiactl apply -f "$EXAMPLES/topology.yaml"

say "maiactl token create --role node-bootstrap   (the fleet registers with it)"
NODE_BOOTSTRAP_TOKEN="$(maiactl token create --role node-bootstrap --name demo-fleet)"

say "starting maia-simnode: $RACKS racks x $NODES_PER_RACK nodes"
MAIA_TOKEN="$NODE_BOOTSTRAP_TOKEN" "$BIN/maia-simnode" --controller "$ADDRESS" --racks "$RACKS" \
  --nodes-per-rack "$NODES_PER_RACK" --load-delay 1.0 --state-dir "$RUN_DIR/simnode-state" \
  >"$RUN_DIR/simnode.out" 2>"$RUN_DIR/simnode.log" &
SIMNODE_PID=$!
maiactl wait nodes --connected $((RACKS * NODES_PER_RACK)) --timeout 60

say "maiactl apply -f tenants.yaml"
maiactl apply -f "$EXAMPLES/tenants.yaml"

DEPLOYMENT_FILES=()
DEPLOYMENTS=()
for f in "$EXAMPLES"/*.yaml; do
  grep -q '^kind: Deployment' "$f" || continue
  DEPLOYMENT_FILES+=(-f "$f")
  DEPLOYMENTS+=("$(sed -n 's/^name: *//p' "$f" | head -n1)")
done
say "maiactl apply ${#DEPLOYMENTS[@]} deployments: ${DEPLOYMENTS[*]}"
maiactl apply "${DEPLOYMENT_FILES[@]}"

say "maiactl wait deployment ... --for running --timeout $WAIT_TIMEOUT"
if ! maiactl wait deployment "${DEPLOYMENTS[@]}" --for running --timeout "$WAIT_TIMEOUT"; then
  maiactl get deployments || true
  fail "not every deployment reached Running"
fi

say "maiactl get deployments"
maiactl get deployments
say "maiactl placements"
maiactl placements
say "maiactl get topology"
maiactl get topology
say "maiactl summary"
maiactl summary
say "maiactl usage"
maiactl usage
say "console and metrics"
"$BIN/python" - "$METRICS_URL" "$CONSOLE_URL" <<'PY' || fail "the metrics endpoint or the console did not answer"
import json, os, sys, urllib.request
request = urllib.request.Request(sys.argv[2] + "api/state", headers={"Authorization": "Bearer " + os.environ["MAIA_TOKEN"]})
state = json.load(urllib.request.urlopen(request, timeout=10))
print(f"console: {sum(len(r['racks']) for z in state['zones'] for r in z['rows'])} racks, "
      f"{len(state['deployments'])} deployments, {len(state['tenants'])} tenants at {sys.argv[2]}")
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for line in text.splitlines():
    if line.startswith(("maia_deployments{", "maia_nodes{", "maia_accelerators_allocated{")):
        print(line)
PY

READY=1
if [[ $KEEP_RUNNING -eq 1 ]]; then
  say "running (Ctrl-C to stop)"
  echo "gRPC:     $ADDRESS    try: MAIA_CONTROLLER=$ADDRESS MAIA_TOKEN=$(cat $ADMIN_TOKEN_FILE) $BIN/maiactl get nodes"
  echo "console:  $CONSOLE_URL#token=$(cat $ADMIN_TOKEN_FILE)"
  echo "metrics:  $METRICS_URL"
  wait "$CONTROLLER_PID" || true
fi

#!/bin/bash
# Side by side with the reference peers, in one run of the shared harness:
#   node-ws, flask-sock-naive, c-limit and c-limit-coalesce (the machine's limits) and this project,
# C load generator, medians of 3, server pinned to CPU 0 and load generator to CPU 1.
# Extra arguments go to run_peers.sh (e.g. --reps 1 --configs "1000:100:0").
# PEERS_FLOOR=1: node-ws and the stack's floor (bench/floor) instead.
# Results: bench/results/peers-<stamp>.{jsonl,md} and the ratios in peers-<stamp>-ratios.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SHARED_BENCH:-$here/../shared/bench}"
[ -x "$shared/run_peers.sh" ] || { echo "no shared bench at $shared (set SHARED_BENCH)" >&2; exit 2; }
work="$(mktemp -d)"
scratch="$(mktemp -d)"
trap 'rm -rf "$work" "$scratch"' EXIT
cp -r "$shared" "$work/bench"           # the shared folder may be read-only
rm -f "$work"/bench/results/peers-*     # keep only this run's results
if [ "${PEERS_FLOOR:-}" = 1 ]; then
  # The stack's floor (bench/floor: gunicorn + Flask + Flask-Sock, nothing of ours) beside node-ws.
  LOADGEN=c TARGET_NAME=floor TARGET_DIR="$here/bench/floor" TARGET_VENV="$here/.venv" TARGET_PATH=/ws \
    TARGET_CMD="gunicorn -k gevent -w 1 --worker-connections 20000 --backlog 4096 -b 127.0.0.1:{PORT} wsgi:app" \
    "$work/bench/run_peers.sh" --targets "node-ws floor" "$@"
else
  LOADGEN=c TARGET_DIR="$here" TARGET_PATH=/ws TARGET_CMD="bench/serve.sh {PORT}" \
    TARGET_ENV="REALTIME_DB=$scratch/bench.db REALTIME_INSTANCE_PATH=$scratch/instance LOG_LEVEL=INFO" \
    "$work/bench/run_peers.sh" --targets "node-ws flask-sock-naive c-limit c-limit-coalesce project" "$@"
fi
mkdir -p "$here/bench/results"
for f in "$work"/bench/results/peers-*.jsonl; do
  stamp="$(basename "$f" .jsonl)"
  cp "$f" "$work/bench/results/$stamp.md" "$here/bench/results/"
  python3 "$here/bench/ratios.py" "$f" | tee "$here/bench/results/$stamp-ratios.md"
done

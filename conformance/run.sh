#!/bin/sh
# `make conformance`: the Autobahn|Testsuite fuzzing client (RFC 6455 conformance) against an echo
# server built on the project's own framing and connection code (conformance/echo_server.py),
# cases 1-7, 9 and 10. Autobahn needs Python 2.7: it gets a virtualenv of its own, with pinned packages.
# Prints the summary; exits 1 if any case failed. Loopback only; the echo server is stopped by its PID.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
# The first candidate that runs (a pyenv shim for python2.7 exists even where no 2.7 is selected).
py2="${PYTHON2:-}"
if [ -z "$py2" ]; then
  for candidate in $(command -v python2.7 || true) /root/.pyenv/versions/2.7*/bin/python; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then py2="$candidate"; break; fi
  done
fi
[ -n "$py2" ] && [ -x "$py2" ] || { echo "conformance needs Python 2.7 (set PYTHON2=/path/to/python2.7)" >&2; exit 2; }
venv="$here/.venv2"
if [ ! -x "$venv/bin/wstest" ]; then
  "$py2" -m pip install --quiet --disable-pip-version-check "virtualenv==20.15.1" >/dev/null
  "$py2" -m virtualenv --quiet "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements-py27.txt"
fi
port="$("$root/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
work="$(mktemp -d)"
"$root/.venv/bin/python" "$here/echo_server.py" "$port" > "$work/echo.log" 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  "$root/.venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done
sed "s/PORT/$port/" "$here/fuzzingclient.json" > "$work/spec.json"
cd "$work"
timeout 1800 "$venv/bin/wstest" -m fuzzingclient -s spec.json > wstest.log 2>&1 || { tail -20 wstest.log; exit 2; }
"$root/.venv/bin/python" "$here/summary.py" reports/index.json

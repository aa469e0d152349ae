#!/bin/sh
# The project as a target of ../shared/bench/run_peers.sh: create the bench users
# its load generator connects as (bench-user-0 .. bench-user-9999), then serve on
# the port the harness chose. REALTIME_DB and friends come from TARGET_ENV.
set -eu
cd "$(dirname "$0")/.."
python bench/prepare_users.py 10000
exec gunicorn -k gevent -w 1 -b "127.0.0.1:$1" wsgi:app

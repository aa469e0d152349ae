#!/bin/sh
# Make sure the system programs the tests drive are installed.
# On Debian as root they are installed with apt-get; elsewhere this says in
# one line what to install, and fails.
set -eu

# command:debian-package pairs the test suite needs.
NEEDS="chromium:chromium redis-server:redis-server"

missing=""
for item in $NEEDS; do
    command -v "${item%%:*}" >/dev/null 2>&1 || missing="$missing ${item#*:}"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    exit 0
fi
echo "the tests need these system packages:$missing (as root: apt-get install$missing)" >&2
exit 1

"""The test plumbing itself: what a test starts does not outlive the test run, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from support import wait_for

TESTS = Path(__file__).resolve().parent.parent

# A test run that ends as pytest-timeout ends one: at once, with no fixture teardown.
DIES_WITH_SERVERS_RUNNING = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from support import RedisServer, Server
redis = RedisServer(Path({workdir!r}) / "redis").start()
srv = Server(Path({workdir!r})).start()
print(srv.proc.pid, redis.proc.pid, flush=True)
os._exit(1)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody has reaped yet is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_servers_a_test_run_started_stop_when_it_ends_without_teardown(tmp_path):
    script = DIES_WITH_SERVERS_RUNNING.format(tests=str(TESTS), workdir=str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    pids = [int(pid) for pid in ended.stdout.split()]
    try:
        assert len(pids) == 2, ended.stderr[-2000:]
        assert wait_for(lambda: not any(running(pid) for pid in pids), timeout=30), [p for p in pids if running(p)]
    finally:
        for pid in pids:  # what the failing check left behind, by PID
            if running(pid):
                os.kill(pid, signal.SIGKILL)

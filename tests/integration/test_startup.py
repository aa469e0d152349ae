"""Start-up: the real gunicorn master refuses an environment that cannot work, with one clear line."""

import pytest
import requests
from support import run_flask, wait_for

from relay.config import SECRET_NAMES

STRONG = "x" * 32


def prod_env(**changes):
    env = {
        "APP_ENV": "production",
        "WS_TOKEN_SECRET": STRONG,
        "WS_ADMIN_SECRET": STRONG + "a",
        "SECRET_KEY": STRONG + "b",
    }
    env.update(changes)
    return env


@pytest.mark.parametrize("name", SECRET_NAMES)
@pytest.mark.parametrize("value", [None, "short-31-bytes-xxxxxxxxxxxxxxxx"], ids=["unset", "31-bytes"])
def test_production_refuses_missing_or_weak_secrets_and_logs_none_of_them(start_server, name, value):
    overrides = prod_env(**{name: value})
    srv = start_server(wait=False, **overrides)
    assert srv.proc.wait(timeout=30) != 0
    log = srv.log_text()
    assert f"cannot start: {name}" in log
    for secret in overrides.values():
        if secret and secret != "production":
            assert secret not in log  # the good ones and the rejected one alike


def test_production_starts_with_strong_secrets_and_ignores_the_test_user(start_server):
    srv = start_server(WS_TEST_USER_ID="bob", **prod_env(METRICS_TOKEN=STRONG + "m"))
    assert requests.get(srv.url + "/api/ws/auth", timeout=5).status_code == 401
    assert "WS_TEST_USER_ID is ignored because APP_ENV=production" in srv.log_text()
    assert srv.health()["env"] == "production"  # the full report, for the metrics token
    assert "MonkeyPatchWarning" not in srv.log_text()  # the master's checks import nothing that patching warns of


def test_production_refuses_a_user_store_that_does_not_exist_or_has_no_users(start_server, tmp_path):
    """Found by an operator's run: a mistyped REALTIME_DB started on a new, empty store, which refused every
    sign-in and socket while /health said "ok". A `flask` command run with the same typo creates the file
    (the review): an empty one is refused too."""
    typo = tmp_path / "typo" / "realtime.db"
    srv = start_server(wait=False, **prod_env(REALTIME_DB=str(typo)))
    assert srv.proc.wait(timeout=30) != 0
    assert f"cannot start: the user store {typo} does not exist or has no users" in srv.log_text()
    assert not typo.parent.exists()
    listed = run_flask({**srv.env}, "users", "list")
    assert listed.returncode == 0 and typo.exists()  # created by the command, empty
    again = start_server(wait=False, **prod_env(REALTIME_DB=str(typo)))
    assert again.proc.wait(timeout=30) != 0
    assert "has no users" in again.log_text()


def test_preload_is_refused_because_greenlets_belong_to_workers(start_server):
    srv = start_server("--preload", wait=False)
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: preload_app is not supported" in srv.log_text()


def test_a_graceful_timeout_shorter_than_the_drain_is_refused(start_server):
    srv = start_server("--graceful-timeout", "3", wait=False, WS_DRAIN_TIMEOUT_MS=5000, WS_CLOSE_TIMEOUT_MS=2000)
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: graceful_timeout is 3 s, shorter than the 7 s" in srv.log_text()


def test_gunicorn_takes_bind_and_workers_from_the_settings(start_server, redis_server):
    srv = start_server(WEB_CONCURRENCY=2, REDIS_URL=redis_server.url)  # WS_PORT: a free port, not 3001
    assert wait_for(lambda: srv.health()["workers"] == 2)
    log = srv.log_text()
    assert f"Listening at: http://127.0.0.1:{srv.port}" in log and log.count("Booting worker") == 2
    # The master checks Redis from a process of its own: one that imported redis-py (and with it ssl)
    # made every worker warn as gevent patched ssl after the fact.
    assert "MonkeyPatchWarning" not in log


@pytest.mark.parametrize(
    "changes,line",
    [
        ({"WS_PORT": "eighty"}, "cannot start: WS_PORT must be a whole number, got 'eighty'."),
        ({"HTTP_SEND_TIMEOUT_MS": "5000"}, "cannot start: HTTP_SEND_TIMEOUT_MS (5000) must be at least"),
    ],
)
def test_a_flask_command_in_a_bad_environment_says_why_in_one_line(tmp_path, changes, line):
    """make run's first step, and an operator's `flask users ...`, printed Flask's traceback of loading the app."""
    import os

    from support import run_flask

    env = {**os.environ, "REALTIME_INSTANCE_PATH": str(tmp_path), **changes}
    done = run_flask(env, "users", "list")
    assert done.returncode == 1 and line in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_web_concurrency_without_redis_is_refused(start_server):
    srv = start_server(wait=False, WEB_CONCURRENCY=2)
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: 2 workers need REDIS_URL" in srv.log_text()


SHARED_CODE = ("libcrypto", "libstdc++", "libgcc_s")  # OpenSSL's digests; the C++ runtime greenlet unwinds through


def _shared_code_kb(pid: int) -> int:
    """Resident KB of the worker's mappings of SHARED_CODE (from /proc/<pid>/smaps)."""
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not line.endswith(" kB\n"):  # a mapping's first line
                counting = len(head) > 5 and any(name in head[5] for name in SHARED_CODE)
            elif counting and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_the_worker_faults_in_its_shared_code_at_boot_not_on_the_first_connect(start_server):
    """The first client would otherwise fault in ~1.5 MB of library code (gunicorn.conf.py's _warm_up)."""
    srv = start_server()
    pid = srv.health()["pid"]
    before = _shared_code_kb(pid)
    with srv.connect("bob", ["system:announcements"]) as client:
        srv.announce("first")
        assert client.expect("ANNOUNCEMENT")["data"]["message"] == "first"
    assert before > 0  # the mappings are there (a renamed library would make this test vacuous)
    assert _shared_code_kb(pid) - before < 256, "a connect touched OpenSSL or the C++ runtime for the first time"


def test_the_embedded_default_needs_no_redis_package(tmp_path):
    """redis is an optional extra (pyproject.toml): without REDIS_URL nothing may import it."""
    import subprocess
    import sys
    from pathlib import Path

    program = (
        "import sys; sys.modules['redis'] = None\n"  # any `import redis` now raises ImportError
        "from app import create_app\n"
        f"app = create_app({{'REALTIME_INSTANCE_PATH': {str(tmp_path / 'instance')!r}, "
        f"'REALTIME_DB': {str(tmp_path / 'realtime.db')!r}, 'SECRET_KEY': 'k' * 40}})\n"
        "assert app.test_client().get('/login').status_code == 200\n"
        "print('served without redis')\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", program], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served without redis" in done.stdout

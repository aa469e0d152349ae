"""Fixtures: ``server`` (one shared gunicorn for the session) and ``start_server`` (a private one)."""

from __future__ import annotations

import pytest

from support import Server, make_users


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A gunicorn gevent server shared by tests that do not change its state."""
    workdir = tmp_path_factory.mktemp("server")
    make_users(workdir / "realtime.db")
    srv = Server(workdir, {"WS_PING_INTERVAL_MS": 30000}).start()
    yield srv
    srv.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start a private server with environment overrides: ``start_server(WS_PING_INTERVAL_MS=200)``."""
    started = []

    def start(*args, wait: bool = True, users: bool = True, **env):
        workdir = tmp_path / f"srv{len(started)}"
        workdir.mkdir()
        if users:
            make_users(workdir / "realtime.db")
        srv = Server(workdir, env, args)
        started.append(srv)
        return srv.start(wait=wait)

    yield start
    for srv in started:
        srv.stop()

"""Fixtures: ``server`` (one shared gunicorn for the session) and ``start_server`` (a private one)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from crowd import Crowd
from support import PASSWORD, RUNNING, RedisServer, Server, make_users


@pytest.fixture(autouse=True)
def stop_leftovers():
    """After each test, stop (by PID) every server it started and left running. Broader fixtures
    (the session's ``server``, a module's) start theirs before this one looks, and are left alone."""
    before = set(RUNNING)
    yield
    for leftover in RUNNING - before:
        leftover.stop()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    make_users(workdir / "realtime.db")
    srv = Server(workdir, {"WS_PING_INTERVAL_MS": 30000}).start()
    yield srv
    srv.stop()


@pytest.fixture
def server(shared_server):
    """A gunicorn gevent server shared by tests that do not change its state; its ``log_events``
    (and ``wait_for_event``) see only what was logged since this test began."""
    shared_server.log_from = shared_server.log_size()
    return shared_server


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


@pytest.fixture
def crowd():
    """Many WebSocket clients at once (see tests/crowd.py)."""
    group = Crowd()
    yield group
    group.close()


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free loopback port, stopped by PID afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# -- browsers ------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium, driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail("browser tests need Debian's chromium: run `make test` as root, or apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def web(browser, request):
    """Open pages signed in as someone: ``page = web(server, "bob")``. Failures leave screenshots."""
    contexts = []

    def open_as(srv, login: str | None, path: str = "/", password: str = PASSWORD, javascript: bool = True):
        context = browser.new_context(java_script_enabled=javascript)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        if login is not None:
            page.goto(srv.url + "/login")
            page.fill("input[name=login]", login)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(srv.url + "/")
        if path != "/" or login is None:
            page.goto(path if path.startswith("about:") else srv.url + path)
        return page

    yield open_as
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for index, context in enumerate(contexts):
        if failed:
            ARTIFACTS.mkdir(exist_ok=True)
            for number, page in enumerate(context.pages):
                page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{index}-{number}.png"), full_page=True)
        context.close()


@pytest.fixture
def supabase():
    """The local stand-in for a Supabase project's endpoints (tests/fake_supabase.py), started and stopped."""
    from fake_supabase import FakeSupabase

    fake = FakeSupabase().start()
    yield fake
    fake.stop()

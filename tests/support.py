"""Test plumbing: a real gunicorn gevent server, real WebSocket clients.

``Server`` starts ``python -m gunicorn -k gevent wsgi:app`` from the project
root (so ``gunicorn.conf.py`` applies exactly as in production) on a free
loopback port, waits for ``/health``, and stops it by PID. ``Client`` wraps
the ``websockets`` sync client with the few verbs the protocol needs.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.sqlite_directory import SqliteDirectory  # noqa: E402
from relay.tokens import TokenService  # noqa: E402

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: in the forked child, only called
_TEST_PROCESS = os.getpid()


# Every gunicorn and redis-server a test started and has not stopped: conftest's ``stop_leftovers``
# stops what a test left running (one started outside a fixture, whose test failed before its own
# ``finally``), so that a failure costs that test only, not two busy cores for the rest of the run.
RUNNING: set[Server | RedisServer] = set()


def _end_with_the_tests() -> None:
    """Run in each server's child process before it starts: SIGTERM it when the test process ends.

    A test that times out ends the run at once (pytest-timeout's thread method calls ``os._exit``), with
    no fixture teardown: the gunicorn and redis-server it started would be left running on the machine.
    (Tied to the thread that started the child: servers are started from the test's own thread.) Between
    fork and here the tests may have ended already: then the child ends itself.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _TEST_PROCESS:
        os._exit(1)


TOKEN_SECRET = "test-token-secret-0123456789-abcdefghijklmnop"
ADMIN_SECRET = "test-admin-secret-0123456789-abcdefghijklmnop"
SESSION_SECRET = "test-session-secret-0123456789-abcdefghijklmn"
PASSWORD = "correct horse battery staple"
# Strong enough for APP_ENV=production (32+ bytes each, all different).
PRODUCTION = {
    "APP_ENV": "production",
    "WS_TOKEN_SECRET": "x" * 40,
    "WS_ADMIN_SECRET": "x" * 40 + "a",
    "SECRET_KEY": "x" * 40 + "b",
}

# id, role, clinic, active
USERS = [
    ("alice", "admin", None, True),
    ("bob", "sales_staff", "clinic-1", True),
    ("carol", "sales_staff", "clinic-2", True),
    ("erin", "nurse", "clinic-1", True),
    ("dave", "sales_staff", "clinic-1", False),
]


def wait_for(predicate, timeout: float = 15, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_users(db_path: Path, users=USERS, password: str = PASSWORD) -> None:
    directory = SqliteDirectory(str(db_path))
    for user_id, role, clinic, active in users:
        directory.add_user(user_id, email=f"{user_id}@example.test", password=password, role=role, clinic_id=clinic)
        if not active:
            directory.set_active(user_id, False)
    directory.close()


@dataclass(eq=False)  # one per process: kept in RUNNING by identity
class Server:
    """One gunicorn process (master + workers) on 127.0.0.1."""

    workdir: Path
    env_overrides: dict = field(default_factory=dict)
    args: tuple = ()
    port: int = 0
    proc: subprocess.Popen | None = None
    # Its output to a pipe the test reads (proc.stdout) instead of the log file: the log helpers see nothing.
    log_pipe: bool = False

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.log_path = self.workdir / f"gunicorn-{self.port}.log"
        # Where log_events starts reading: the shared server's fixture moves it to the end of the log
        # at each test, so that a line an earlier test wrote cannot pass for this test's.
        self.log_from = 0
        self.env = {
            **os.environ,
            "APP_ENV": "development",
            "WS_HOST": "127.0.0.1",
            "WS_PORT": str(self.port),
            "WS_TOKEN_SECRET": TOKEN_SECRET,
            "WS_ADMIN_SECRET": ADMIN_SECRET,
            "SECRET_KEY": SESSION_SECRET,
            "REALTIME_DB": str(self.workdir / "realtime.db"),
            "REALTIME_INSTANCE_PATH": str(self.workdir / "instance"),
            "WEB_CONCURRENCY": "1",
            "LOG_LEVEL": "INFO",
            **{k: str(v) for k, v in self.env_overrides.items() if v is not None},
        }
        for name in [k for k, v in self.env_overrides.items() if v is None]:
            self.env.pop(name, None)  # None means "unset"
        if "WS_TEST_USER_ID" not in self.env_overrides:
            self.env.pop("WS_TEST_USER_ID", None)  # a developer's shell must not leak into tests
        secret = self.env.get("WS_TOKEN_SECRET") or "unused"
        self.tokens = TokenService(secret, int(self.env.get("WS_TOKEN_TTL_MS", 600000)))

    # -- process -----------------------------------------------------------------

    def start(self, wait: bool = True) -> Server:
        self._log = open(self.log_path, "ab")
        self.log_from = self.log_size()  # a server started again on a port shares its log file
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gevent", *self.args, "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE if self.log_pipe else self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_end_with_the_tests,
        )
        RUNNING.add(self)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not become healthy in {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM by PID, then SIGKILL if it will not go; the exit code (None if never started)."""
        if self.proc is None:
            return None
        RUNNING.discard(self)
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        finally:
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_events(self, name: str | None = None) -> list[dict]:
        """Structured log lines (JSON) from ``log_from`` on, optionally only those with ``event == name``."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_from)
            text = log.read().decode(errors="replace")
        events = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if name is None or record.get("event") == name:
                    events.append(record)
        return events

    def wait_for_event(self, name: str, predicate=lambda e: True, timeout: float = 5) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_events(name):
                if predicate(record):
                    return record
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} log event matched within {timeout}s")

    # -- protocol ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user_id: str, **kwargs) -> str:
        return self.tokens.mint(user_id, **kwargs)

    def open(self, token: str | None, **kwargs) -> Client:
        """Open a socket with a raw token (no CONNECTED expected)."""
        url = self.ws_url if token is None else f"{self.ws_url}?token={quote(token, safe='')}"
        return Client(connect(url, open_timeout=5, close_timeout=2, max_size=2**22, **kwargs))

    def connect(self, user_id: str, channels: list[str] | None = None, **kwargs) -> Client:
        """Open a socket as ``user_id``, expect CONNECTED, optionally subscribe."""
        client = self.open(self.token(user_id), **kwargs)
        try:
            hello = client.expect("CONNECTED")
            client.client_id, client.hello = hello["data"]["clientId"], hello["data"]
            if channels:
                client.subscribe(channels)
        except BaseException:
            client.close()
            raise
        return client

    def broadcast(self, body, secret: str | None = ADMIN_SECRET, headers: dict | None = None) -> requests.Response:
        sent = dict(headers or {})
        if secret is not None and "Authorization" not in sent and "X-Admin-Secret" not in sent:
            sent["Authorization"] = f"Bearer {secret}"
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(
            self.url + "/broadcast", data=data, headers={"Content-Type": "application/json", **sent}, timeout=10
        )

    def announce(self, text: str = "hello", type_: str = "ANNOUNCEMENT", **flt) -> dict:
        response = self.broadcast({"message": {"type": type_, "data": {"message": text}}, "filter": flt})
        assert response.status_code == 200, response.text
        return response.json()

    def health(self) -> dict:
        """The full report: in production with the server's METRICS_TOKEN (the summary without one)."""
        token = self.env.get("METRICS_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return requests.get(self.url + "/health", headers=headers, timeout=5).json()

    def wait_rechecks(self, rounds: int, timeout: float = 15) -> bool:
        """Whether ``rounds`` more identity re-checks finished within ``timeout`` (one under way counts:
        ask for two to be sure one began after now)."""
        done = self.health()["identityWatch"]["rechecks"]
        return bool(wait_for(lambda: self.health()["identityWatch"]["rechecks"] >= done + rounds, timeout=timeout))

    def wait_clients(self, count: int, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["clients"] == count or time.monotonic() > deadline:
                return health
            time.sleep(0.05)


def run_flask(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``flask --app app ...`` from the project root in ``env``, as an operator on that box would run it
    (``stdin`` piped to it: not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def flask_cli(srv: Server, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``flask --app app ...`` in a running server's environment (plus ``env``)."""
    return run_flask({**srv.env, **env}, *args, stdin=stdin)


def csrf_of(html: str) -> str:
    """The CSRF token a page carries in <meta name="csrf-token">."""
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


def sign_in(
    srv: Server, login: str, password: str = PASSWORD, session: requests.Session | None = None
) -> requests.Session:
    """Post the sign-in form as a browser would; the answer is kept as ``session.last``."""
    session = session or requests.Session()
    page = session.get(srv.url + "/login", timeout=5)
    session.last = session.post(
        srv.url + "/login",
        data={"login": login, "password": password, "csrf_token": csrf_of(page.text)},
        timeout=10,
        allow_redirects=False,
    )
    return session


def set_cookie(response: requests.Response, name: str) -> str:
    """The ``Set-Cookie`` header of the answer that sets cookie ``name`` (requests joins them all)."""
    found = [h for h in response.raw.headers.getlist("Set-Cookie") if h.startswith(name + "=")]
    assert len(found) == 1, found
    return found[0]


class RedisServer:
    """``redis-server`` on 127.0.0.1 with persistence off; killed and restarted by PID in tests."""

    def __init__(self, workdir: Path, port: int = 0):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `make test` as root, or apt-get install redis-server"
            )
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_end_with_the_tests,
        )
        RUNNING.add(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like to the workers."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        RUNNING.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.client_id = None

    def send(self, message) -> None:
        self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def recv(self, timeout: float = 5) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def expect(self, type_: str, timeout: float = 5) -> dict:
        message = self.recv(timeout)
        assert message.get("type") == type_, f"expected {type_}, got {message}"
        return message

    def subscribe(self, channels: list[str]) -> dict:
        self.send({"type": "SUBSCRIBE", "data": {"channels": channels}})
        return self.expect("SUBSCRIBED")

    def nothing_within(self, seconds: float) -> bool:
        """True if no message arrives within ``seconds``."""
        try:
            message = self.ws.recv(timeout=seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected message {message}")

    def closed_with(self, timeout: float = 5) -> tuple[int | None, str]:
        """Read until the server closes; return its close code and reason."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, "")
        except TimeoutError:
            pass
        raise AssertionError(f"the server did not close the socket within {timeout}s")

    def close(self) -> None:
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Resumer:
    """A client that remembers where it was and resumes there, as realtime.js does.

    ``received`` keeps every broadcast in arrival order (duplicates included,
    so that a test can see them); ``offset`` is the last one processed.
    """

    def __init__(self, srv: Server, user_id: str, channels: list[str] | None = None):
        self.srv, self.user_id, self.channels = srv, user_id, channels or []
        self.client_id: str | None = None
        self.epoch: str | None = None
        self.offset: int | None = None
        self.received: list[dict] = []
        self.ws = None

    def at_its_place(self, srv: Server | None = None, user_id: str | None = None) -> Resumer:
        """Another client holding this one's client id, epoch and offset (a resume of its session), on ``srv``
        as ``user_id`` (by default this one's)."""
        other = Resumer(srv or self.srv, user_id or self.user_id)
        other.client_id, other.epoch, other.offset = self.client_id, self.epoch, self.offset
        return other

    def connect(self, *, resuming: bool = True, **params) -> dict:
        """Open a socket (resuming where it was, if it has been connected before); returns CONNECTED's data.

        ``params`` are added to (or replace) the query: ``offset="-1"`` sends a bad one.
        """
        url = f"{self.srv.ws_url}?token={quote(self.srv.token(self.user_id), safe='')}"
        if resuming and self.client_id is not None:
            params = {"resume": self.client_id, "epoch": self.epoch, "offset": self.offset, **params}
        url += "".join(f"&{key}={quote(str(value), safe='')}" for key, value in params.items())
        self.ws = connect(url, open_timeout=10, close_timeout=2, max_size=2**22)
        hello = json.loads(self.ws.recv(timeout=10))
        assert hello["type"] == "CONNECTED", hello
        data = hello["data"]
        self.client_id, self.epoch = data["clientId"], data.get("epoch")
        if not data.get("recovered"):
            self.offset = data.get("offset")
            if self.channels:
                self.ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": self.channels}}))
                self._until("SUBSCRIBED")
        return data

    def _until(self, type_: str, timeout: float = 5) -> dict:
        while True:
            message = json.loads(self.ws.recv(timeout=timeout))
            if message["type"] == type_:
                return message
            self._take(message)

    def _take(self, message: dict) -> None:
        if "offset" in message and not message.get("last"):
            self.received.append(message)
            self.offset = message["offset"]

    def read(self, quiet: float = 0.5, limit: int = 100_000) -> list[dict]:
        """Broadcasts until nothing arrives for ``quiet`` seconds; returns the ones read now."""
        start = len(self.received)
        try:
            for _ in range(limit):
                self._take(json.loads(self.ws.recv(timeout=quiet)))
        except (TimeoutError, ConnectionClosed):
            pass
        return self.received[start:]

    def drop(self) -> None:
        """Lose the connection without a goodbye (a Wi-Fi drop): the TCP connection just ends."""
        try:
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the server closed it already
        self.ws.recv_events_thread.join(5)  # the client library sees the end by itself, and cleans up

    @property
    def closed(self) -> bool:
        return self.ws is None or self.ws.protocol.state.name == "CLOSED"

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()

    @property
    def ids(self) -> list[str]:
        return [message["id"] for message in self.received]


def sign_in_elsewhere(page, srv: Server, login: str = "bob") -> None:
    """Sign a browser page's user in again from another tab of its browser (the two share their cookies)."""
    other = page.context.new_page()
    other.goto(srv.url + "/login")
    other.fill("input[name=login]", login)
    other.fill("input[name=password]", PASSWORD)
    other.click("form[action='/login'] button[type=submit]")  # (the top bar has Sign out buttons)
    other.wait_for_url(srv.url + "/")
    other.close()


def sign_out_elsewhere(page, srv: Server) -> None:
    """Sign a browser page's user out from another tab of its browser."""
    other = page.context.new_page()
    other.goto(srv.url + "/")
    other.click("form[action='/logout'] button[type=submit]")
    other.wait_for_url("**/login**")
    other.close()

"""Operator tools: ``flask ws ...`` against a running server, ``flask users ...`` on the store."""

import os
import stat
import subprocess
import sys

import pytest
from support import ROOT, Server, flask_cli, run_flask, sign_in, wait_for

from app import create_app
from relay.codes import Close
from relay.sqlite_directory import UserError


def test_smoke_passes_against_a_running_server(start_server):
    srv = start_server(WS_TEST_USER_ID="bob")
    done = flask_cli(srv, "ws", "smoke", "--url", srv.url)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("health", "token", "connect", "subscribe", "broadcast", "receive"):
        assert f"ok   {step}" in done.stdout
    assert "smoke test passed" in done.stdout


def test_smoke_can_mint_its_own_token_for_a_named_user(server: Server):
    done = flask_cli(server, "ws", "smoke", "--url", server.url, "--user", "carol")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "minted locally" in done.stdout


def test_smoke_with_a_user_but_no_token_secret_names_the_secret(server: Server, tmp_path):
    """It advised passing --user, which had been passed (found by review)."""
    done = flask_cli(
        server, "ws", "smoke", "--url", server.url, "--user", "carol",
        WS_TOKEN_SECRET="", REALTIME_INSTANCE_PATH=str(tmp_path),  # before any server wrote dev secrets here
    )  # fmt: skip
    assert done.returncode == 1
    assert "FAIL token" in done.stdout and "--user needs WS_TOKEN_SECRET" in done.stdout


def test_smoke_fails_loudly_with_the_step_that_broke(server: Server):
    done = flask_cli(server, "ws", "smoke", "--url", server.url, "--user", "carol", WS_ADMIN_SECRET="wrong-" * 6)
    assert done.returncode == 1
    assert "FAIL broadcast" in done.stdout and "unauthorized" in done.stdout
    assert "smoke test FAILED" in done.stderr


def test_smoke_says_why_a_channel_was_refused(server: Server):
    """It printed ``FAIL subscribe SUBSCRIBED []`` without the reason the server gave (ops review)."""
    done = flask_cli(
        server, "ws", "smoke", "--url", server.url, "--user", "carol", "--channel", "clinic:clinic-1:queue"
    )
    assert done.returncode == 1 and "FAIL subscribe" in done.stdout and "forbidden_channel" in done.stdout


def test_smoke_says_what_a_refused_socket_means(server: Server):
    """An operator's run: ``ConnectionClosedError: received 4403 (private use) unknown user; then sent 4403``."""
    done = flask_cli(server, "ws", "smoke", "--url", server.url, "--user", "nobody-here")
    assert done.returncode == 1
    assert "closed 4403 unknown user (the user is unknown or disabled: `flask users list`" in done.stdout
    assert "FAIL connect" in done.stdout


def test_smoke_against_nothing_fails_at_health(server: Server):
    done = flask_cli(server, "ws", "smoke", "--url", "http://127.0.0.1:9", "--user", "carol")
    assert done.returncode == 1 and "FAIL health" in done.stdout


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:9", "--url must start with http:// or https://"),
        ("http://127.0.0.1:abc", "--url has a port that is not a number"),
        ("http://127.0.0.1:3001/é", "--url must be plain ASCII"),
        ("http://:3001", "--url names no host"),
        ("http://127.0.0.1:3001/health", "--url is the server's address, not one of its endpoints: leave /health out"),
        ("http://127.0.0.1:3001/ws/", "leave /ws out"),
    ],
)
def test_a_url_that_is_not_one_is_a_usage_error_not_a_traceback(server: Server, url, says):
    done = flask_cli(server, "ws", "health", "--url", url)
    assert done.returncode == 1 and says in done.stderr
    assert "Traceback" not in done.stderr


def test_a_redirect_is_not_followed_with_the_admin_secret(server: Server):
    """A proxy at --url that redirects elsewhere: urllib would send the Authorization header along."""
    import http.server
    import threading

    seen: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (urllib follows a 301 to a POST with a GET, headers and all)
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    class Redirector(Elsewhere):
        def do_POST(self):  # noqa: N802
            self.send_response(301)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)
    redirector = http.server.HTTPServer(("127.0.0.1", 0), Redirector)
    for one in (elsewhere, redirector):
        threading.Thread(target=one.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirector.server_port}"
        done = flask_cli(server, "ws", "broadcast", "--url", url, "--message", "hello", "--everyone")
        # And a server there that is not this service: a clear error, not a traceback.
        other = flask_cli(
            server,
            "ws",
            "broadcast",
            "--url",
            f"http://127.0.0.1:{elsewhere.server_port}",
            "--message",
            "x",
            "--everyone",
        )
    finally:
        for one in (elsewhere, redirector):
            one.shutdown()
            one.server_close()
    assert done.returncode == 1 and "answered 301, a redirect to" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(seen) == 1  # only the request made to it directly
    assert other.returncode == 1 and "not this service's answer to a broadcast" in other.stderr, other.stderr


def test_health_and_broadcast_commands(server: Server):
    done = flask_cli(server, "ws", "health", "--url", server.url)
    assert done.returncode == 0 and '"ok": true' in done.stdout
    with server.connect("erin", ["clinic:clinic-1:queue"]) as erin:
        done = flask_cli(
            server,
            "ws",
            "broadcast",
            "--url",
            server.url,
            "--message",
            "Queue moved",
            "--type",
            "QUEUE_UPDATE",
            "--channels",
            "clinic:clinic-1:queue",
            "--roles",
            "nurse,admin",
        )
        assert done.returncode == 0, done.stderr
        assert "delivered to 1 connection(s)" in done.stdout
        message = erin.expect("QUEUE_UPDATE")
        assert message["data"]["message"] == "Queue moved" and message["data"]["at"].endswith("Z")


def test_broadcast_command_reports_validation_errors(server: Server):
    done = flask_cli(server, "ws", "broadcast", "--url", server.url, "--message", "x", "--type", "lower", "--everyone")
    assert done.returncode != 0 and "invalid_body" in done.stderr


def test_broadcast_command_sends_to_everyone_only_when_told(server: Server):
    """A forgotten --channels sent the message to every connected client of every clinic (ops review)."""
    with server.connect("erin", ["clinic:clinic-1:queue"]) as erin:
        for forgot in ((), ("--channels", " , ")):
            done = flask_cli(server, "ws", "broadcast", "--url", server.url, "--message", "oops", *forgot)
            assert done.returncode == 2 and "--everyone" in done.stderr, done.stdout + done.stderr
        both = ("--channels", "system:announcements", "--everyone")
        done = flask_cli(server, "ws", "broadcast", "--url", server.url, "--message", "oops", *both)
        assert done.returncode == 2 and "leave it out" in done.stderr
        done = flask_cli(server, "ws", "broadcast", "--url", server.url, "--message", "to all", "--everyone")
        assert done.returncode == 0 and "delivered to 1 connection(s)" in done.stdout, done.stderr
        assert erin.expect("ANNOUNCEMENT")["data"]["message"] == "to all"  # the first message it got


@pytest.fixture
def cli(tmp_path):
    app = create_app(
        {
            "REALTIME_DB": str(tmp_path / "users.db"),
            "REALTIME_INSTANCE_PATH": str(tmp_path / "instance"),
            "TESTING": True,
        }
    )
    runner = app.test_cli_runner()
    runner.directory = app.extensions["realtime"].directory
    return runner


def test_users_add_list_set_role_disable(cli):
    result = cli.invoke(
        args=[
            "users",
            "add",
            "u-1",
            "--email",
            "u1@example.test",
            "--password",
            "pw-123456",
            "--role",
            "sales_staff",
            "--clinic",
            "clinic-7",
        ]
    )
    assert result.exit_code == 0, result.output
    assert cli.directory.authenticate("u1@example.test", "pw-123456").clinic_id == "clinic-7"
    assert cli.invoke(args=["users", "set-role", "u-1", "admin"]).exit_code == 0
    assert cli.directory.get("u-1").role == "admin"
    listing = cli.invoke(args=["users", "list"]).output
    assert "u-1" in listing and "admin" in listing and "1 user(s)" in listing
    assert cli.invoke(args=["users", "disable", "u-1"]).exit_code == 0
    assert cli.directory.get("u-1").active is False
    assert cli.directory.authenticate("u1@example.test", "pw-123456") is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["users", "add", "bad id", "--role", "x", "--no-password"], "must match"),
        (["users", "add", "u-2", "--role", "x", "--clinic", "a:b", "--no-password"], "clinic id"),
        (["users", "set-role", "ghost", "admin"], "no user with id 'ghost'"),
        (["users", "disable", "ghost"], "no user with id 'ghost'"),
        # "José" typed in Latin-1 into a UTF-8 locale arrives as a lone surrogate: these were tracebacks.
        (["users", "add", "u-3", "--role", "x", "--name", "Jos\udce9", "--no-password"], "not valid UTF-8"),
        (["users", "add", "u-3", "--role", "x", "--email", "jos\udce9@x.test", "--password", "pw-123456"], "UTF-8"),
        (["users", "add", "u-3", "--role", "x", "--password", "s\udce9same-123"], "not valid UTF-8"),
        (["users", "set-password", "u-3", "--password", "s\udce9same-123"], "not valid UTF-8"),
        (["ws", "identity", "check", "jos\udce9"], "not valid UTF-8"),
        # Both was a user who could sign in, made by an operator who asked for one who could not.
        (["users", "add", "u-4", "--role", "x", "--password", "pw-123456", "--no-password"], "not both"),
        # A control character in an email is a typo (or a terminal's escape), and ends up in every log line.
        (["users", "add", "u-5", "--role", "x", "--email", "a\x1b[2Jb@x.test", "--no-password"], "not an email"),
        (["users", "add", "u-5", "--role", "x", "--email", "ab@x.test\x00", "--no-password"], "not an email"),
        (["users", "add", "u-5", "--role", "x", "--email", "a\x9b2Jb@x.test", "--no-password"], "not an email"),
        (["users", "add", "u-5", "--role", "x", "--email", "ab\u202e@x.test", "--no-password"], "not an email"),
    ],
)
def test_users_commands_explain_what_is_wrong(cli, args, message):
    result = cli.invoke(args=args)
    assert result.exit_code != 0 and message in result.output


def test_users_input_that_would_lock_someone_out_or_mislead_is_refused(cli):
    """Found by review: an email equal to another user's id (sign-in takes either, and found the wrong
    one), a role with a trailing space (printed as admin, not admin), an empty password (no sign-in
    form accepts one), an email that is not one."""
    assert cli.invoke(args=["users", "add", "alice", "--role", "nurse", "--password", "pw-alice"]).exit_code == 0
    assert cli.invoke(args=["users", "add", "ann@x.test", "--role", "nurse", "--no-password"]).exit_code == 0
    cases = [
        (
            ["users", "add", "zed", "--email", "ann@x.test", "--role", "nurse", "--no-password"],
            "already another user's",
        ),
        (["users", "add", "carol", "--email", " ", "--role", "nurse", "--no-password"], "is not an email address"),
        (["users", "add", "carol", "--role", "nurse", "--password", ""], "a password cannot be empty"),
        (["users", "set-role", "alice", "admin "], "must be one word"),
        (["users", "set-role", "alice", "Admin"], "roles are case-sensitive"),
    ]
    for args, message in cases:
        result = cli.invoke(args=args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert (
        cli.invoke(args=["users", "add", "dan", "--email", "dan@x.test", "--role", "nurse", "--no-password"]).exit_code
        == 0
    )
    taken = cli.invoke(args=["users", "add", "dan@x.test", "--role", "nurse", "--no-password"])  # an id = an email
    assert taken.exit_code != 0 and "already another user's" in taken.output
    with pytest.raises(UserError, match="a password cannot be empty"):  # what set-password calls
        cli.directory.set_password("alice", "")
    assert cli.directory.authenticate("alice", "pw-alice").role == "nurse"  # nothing above changed alice
    assert [u.user_id for u in cli.directory.list_users()] == ["alice", "ann@x.test", "dan"]


def test_duplicate_user_is_refused(cli):
    args = ["users", "add", "u-3", "--email", "same@example.test", "--role", "x", "--no-password"]
    assert cli.invoke(args=args).exit_code == 0
    again = cli.invoke(args=["users", "add", "u-4", "--email", "same@example.test", "--role", "x", "--no-password"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_user_added_while_running_can_connect_at_once(server: Server):
    done = flask_cli(server, "users", "add", "newcomer", "--role", "sales_staff", "--no-password")
    assert done.returncode == 0, done.stderr
    with server.connect("newcomer"):
        pass
    flask_cli(server, "users", "disable", "newcomer")
    with server.open(server.token("newcomer")) as client:
        assert client.closed_with()[0] == Close.FORBIDDEN


def test_identity_check_finds_a_user_in_the_sqlite_store_and_has_nothing_to_warn_about(server: Server):
    found = flask_cli(server, "ws", "identity", "check", "bob")
    assert found.returncode == 0, found.stderr
    assert '"sqlite"' in found.stdout and '"userId": "bob"' in found.stdout
    assert "WARNING" not in found.stderr  # its users are those an operator added: nobody signs up
    assert flask_cli(server, "ws", "identity", "check", "nobody-here").returncode == 1
    assert server.log_events("identity.project_warning") == []


# -- a fresh checkout: every command works whatever the environment gives -------------------

SECRETS = {"WS_TOKEN_SECRET": "t" * 40, "WS_ADMIN_SECRET": "a" * 40, "SECRET_KEY": "s" * 40}


def fresh_env(tmp_path, *, secrets: bool, db_outside: bool) -> dict:
    """The environment of a fresh clone: an instance folder that does not exist yet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "REALTIME_", "SUPABASE_", "REDIS_"))}
    env["REALTIME_INSTANCE_PATH"] = str(tmp_path / "no" / "instance" / "yet")
    if db_outside:
        env["REALTIME_DB"] = str(tmp_path / "elsewhere" / "users.db")
    if secrets:
        env.update(SECRETS)
    return env


@pytest.mark.parametrize("secrets", [True, False], ids=["env-secrets", "no-secrets"])
@pytest.mark.parametrize("db_outside", [True, False], ids=["db-outside-instance", "db-in-instance"])
def test_users_add_works_on_a_fresh_checkout_and_creates_only_that_user(tmp_path, secrets, db_outside):
    env = fresh_env(tmp_path, secrets=secrets, db_outside=db_outside)
    added = run_flask(
        env, "users", "add", "u1", "--email", "u1@example.com", "--password", "pw-123456", "--role", "admin"
    )
    assert added.returncode == 0, added.stdout + added.stderr
    listing = run_flask(env, "users", "list")
    assert listing.returncode == 0 and "1 user(s)" in listing.stdout and "demo" not in listing.stdout
    assert not (tmp_path / "no" / "instance" / "yet" / "dev-secrets.json").exists()  # commands write no secrets


def test_seed_demo_creates_three_users_once_and_prints_how_to_sign_in(tmp_path):
    env = fresh_env(tmp_path, secrets=False, db_outside=False)
    first = run_flask(env, "users", "seed-demo")
    assert first.returncode == 0, first.stderr
    assert "Demo users created" in first.stdout and "/login" in first.stdout
    kept = tmp_path / "no" / "instance" / "yet" / "demo-users.txt"
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    for email in ("admin@demo.clinic", "staff1@demo.clinic", "staff2@demo.clinic"):
        line = next(line for line in first.stdout.splitlines() if line.startswith(email))
        password = line.split("password")[1].split()[0]
        assert line in kept.read_text()
        app = create_app({**env, "TESTING": True})
        assert app.extensions["realtime"].directory.authenticate(email, password) is not None
    again = run_flask(env, "users", "seed-demo")
    assert again.returncode == 0 and "Demo users created" not in again.stdout
    assert f"demo passwords are in {kept}" in again.stdout
    assert "3 user(s)" in run_flask(env, "users", "list").stdout


def test_seed_demo_never_creates_users_in_production(tmp_path):
    env = {**fresh_env(tmp_path, secrets=True, db_outside=True), "APP_ENV": "production"}
    done = run_flask(env, "users", "seed-demo")
    assert done.returncode == 0 and "never created" in done.stdout
    assert "0 user(s)" in run_flask(env, "users", "list").stdout


def test_commands_that_need_a_secret_say_so_before_the_first_start(tmp_path):
    env = fresh_env(tmp_path, secrets=False, db_outside=False)
    done = run_flask(env, "ws", "broadcast", "--url", "http://127.0.0.1:9", "--message", "x", "--everyone")
    assert done.returncode == 1 and "no admin secret: set WS_ADMIN_SECRET (in development the server" in done.stderr


def checkout_copy(tmp_path) -> str:
    """The tracked files only, as a fresh clone has them (no instance/ folder, no build output)."""
    import shutil

    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    target = tmp_path / "clone"
    for name in listed.splitlines():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return str(target)


def test_the_reported_case_default_instance_folder_and_the_db_elsewhere(tmp_path):
    """Bug 1 as reported: REALTIME_INSTANCE_PATH unset (./instance), REALTIME_DB outside it, secrets given."""
    clone = checkout_copy(tmp_path)
    env = fresh_env(tmp_path, secrets=True, db_outside=True)
    del env["REALTIME_INSTANCE_PATH"]
    args = ["users", "add", "u1", "--email", "u1@example.com", "--password", "pw-123456", "--role", "admin"]
    added = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=clone,
        env={**env, "PYTHONPATH": clone},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert (tmp_path / "elsewhere" / "users.db").exists()


def test_a_fresh_start_with_no_secrets_and_no_database_given(start_server, tmp_path):
    """The server creates its instance folder, development secrets (0600) and database, and keeps them."""
    import json

    instance = tmp_path / "fresh" / "instance"
    unset = dict(WS_TOKEN_SECRET=None, WS_ADMIN_SECRET=None, SECRET_KEY=None, REALTIME_DB=None)
    srv = start_server(users=False, REALTIME_INSTANCE_PATH=str(instance), **unset)
    secrets_file = instance / "dev-secrets.json"
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600
    secrets = json.loads(secrets_file.read_text())
    added = run_flask(srv.env, "users", "add", "newbie", "--role", "nurse", "--clinic", "c1", "--no-password")
    assert added.returncode == 0, added.stderr
    assert "development secrets" not in added.stderr  # the server said so as it started; a command does not
    assert wait_for(lambda: "development secrets for" in srv.log_text())
    assert (instance / "realtime.db").exists()
    from relay.tokens import TokenService

    token = TokenService(secrets["WS_TOKEN_SECRET"], 600_000).mint("newbie")
    with srv.open(token) as client:
        assert client.expect("CONNECTED")["data"]["userId"] == "newbie"
    srv.stop()
    again = Server(srv.workdir, srv.env_overrides)
    again.start()
    try:
        assert json.loads(secrets_file.read_text()) == secrets  # the same secrets: tokens keep working
        with again.open(token) as client:
            assert client.expect("CONNECTED")["data"]["userId"] == "newbie"
    finally:
        again.stop()


def test_a_role_no_other_user_has_is_set_with_a_note_that_may_catch_a_typo(cli):
    """ "admn" answered "is now admn", exit 0, and the user had quietly lost the admin pages (ops review)."""
    for user_id, role in (("ann", "admin"), ("bo", "nurse")):
        assert cli.invoke(args=["users", "add", user_id, "--role", role, "--no-password"]).exit_code == 0
    typo = cli.invoke(args=["users", "set-role", "ann", "admn"])
    assert typo.exit_code == 0 and "no other user has role 'admn' (roles in use: nurse)" in typo.output
    usual = cli.invoke(args=["users", "set-role", "ann", "nurse"])
    assert usual.exit_code == 0 and "note:" not in usual.output
    added = cli.invoke(args=["users", "add", "cy", "--role", "nurse_", "--no-password"])
    assert added.exit_code == 0 and "no other user has role 'nurse_'" in added.output


def test_a_password_piped_to_users_add_and_set_password_is_read_without_a_warning(start_server):
    """A script pipes the password (no terminal): getpass warned that it could not hide it, on every run."""
    server = start_server()
    add = ("users", "add", "piped-1", "--role", "nurse", "--email", "piped@x.test")
    done = flask_cli(server, *add, stdin="first-pw-1\n")
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "first-pw-1" not in done.stdout + done.stderr
    assert sign_in(server, "piped@x.test", "first-pw-1").last.status_code == 302
    done = flask_cli(server, "users", "set-password", "piped-1", "--url", server.url, stdin="second-pw-2\n")
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr
    assert sign_in(server, "piped@x.test", "second-pw-2").last.status_code == 302
    nothing = flask_cli(server, "users", "add", "piped-2", "--role", "nurse", stdin="")
    assert nothing.returncode == 2 and "no password: give --password" in nothing.stderr

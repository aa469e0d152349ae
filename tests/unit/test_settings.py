"""Settings: read once, validated, never written; development secrets only where the serving process made them."""

import json
import os
import re
import stat
from urllib.parse import quote

import pytest

from relay.config import (
    DAY_MS,
    DEV_SECRETS_FILE,
    MAX_LAST_VALUE_TTL_MS,
    SECRET_NAMES,
    ConfigError,
    Settings,
    prepare_instance,
    redacted,
)

STRONG = "x" * 32


def prod_env(**changes):
    env = {
        "APP_ENV": "production",
        "WS_TOKEN_SECRET": STRONG,
        "WS_ADMIN_SECRET": STRONG + "a",
        "SECRET_KEY": STRONG + "b",
    }
    env.update(changes)
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("name", SECRET_NAMES)
@pytest.mark.parametrize("value", [None, "", "short-31-bytes-xxxxxxxxxxxxxxxx"], ids=["unset", "empty", "31-bytes"])
def test_production_refuses_missing_or_weak_secrets_naming_the_variable(tmp_path, name, value):
    env = prod_env(**{name: value}, REALTIME_INSTANCE_PATH=str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert str(refused.value).startswith(name)
    if value:
        assert value not in str(refused.value)  # the rejected secret itself is never echoed


def test_production_names_every_missing_or_weak_secret_at_once(tmp_path):
    """Found by an operator's run: one per start, three restarts to learn of three problems."""
    env = prod_env(WS_TOKEN_SECRET=None, SECRET_KEY=None, WS_ADMIN_SECRET="short", REALTIME_INSTANCE_PATH=str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    said = str(refused.value)
    assert said.startswith("WS_TOKEN_SECRET and SECRET_KEY are not set; production needs secrets of at least 32 bytes")
    assert "WS_ADMIN_SECRET is 5 bytes; production needs at least 32" in said and "short" not in said
    # The optional ones, when given, in the same message.
    env = prod_env(
        SECRET_KEY=None, METRICS_TOKEN="m" * 8, WS_TOKEN_SECRET_PREVIOUS="p" * 9, REALTIME_INSTANCE_PATH=str(tmp_path)
    )
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    said = str(refused.value)
    assert said.startswith("SECRET_KEY is not set; production needs a secret of at least 32 bytes")
    assert "WS_TOKEN_SECRET_PREVIOUS is 9 bytes; METRICS_TOKEN is 8 bytes; production needs at least 32" in said
    assert "set longer values" in said


def test_reading_settings_writes_nothing_and_a_missing_dev_secret_is_none(tmp_path):
    instance = tmp_path / "not-yet"
    settings = Settings.from_env({"REALTIME_INSTANCE_PATH": str(instance)})
    assert not instance.exists()
    assert (settings.token_secret, settings.admin_secret, settings.secret_key) == (None, None, None)
    assert any("first start" in notice for notice in settings.notices)


def test_the_serving_process_generates_dev_secrets_once_with_mode_0600(tmp_path):
    env = {"APP_ENV": "development", "REALTIME_INSTANCE_PATH": str(tmp_path / "instance")}
    notices = prepare_instance(env)
    path = tmp_path / "instance" / DEV_SECRETS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and str(path) in notices[0]
    first = Settings.from_env(env)
    stored = json.loads(path.read_text())
    assert stored["WS_TOKEN_SECRET"] == first.token_secret and len(first.token_secret) >= 32
    assert len({first.token_secret, first.admin_secret, first.secret_key}) == 3
    assert prepare_instance(env) == []  # idempotent
    again = Settings.from_env(env)
    assert (again.token_secret, again.admin_secret, again.secret_key) == (
        first.token_secret,
        first.admin_secret,
        first.secret_key,
    )


def test_secrets_given_in_the_environment_are_kept_and_not_written(tmp_path):
    env = {"WS_TOKEN_SECRET": STRONG, "REALTIME_INSTANCE_PATH": str(tmp_path)}
    prepare_instance(env)
    assert Settings.from_env(env).token_secret == STRONG
    assert "WS_TOKEN_SECRET" not in json.loads((tmp_path / DEV_SECRETS_FILE).read_text())


def test_production_never_writes_an_instance_folder(tmp_path):
    env = prod_env(REALTIME_INSTANCE_PATH=str(tmp_path / "instance"))
    assert prepare_instance(env) == []
    assert not (tmp_path / "instance").exists()


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"WS_PORT": "eighty"}, "WS_PORT must be a whole number"),
        ({"WS_PORT": "70000"}, "WS_PORT must be between"),
        ({"WS_TOKEN_TTL_MS": "-5"}, "WS_TOKEN_TTL_MS"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"WS_PUBLIC_URL": "http://example.com"}, "WS_PUBLIC_URL must be a ws:// or wss:// URL"),
        ({"WS_ALLOWED_ORIGINS": "example.com"}, "WS_ALLOWED_ORIGINS"),
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL must start with"),
        # An unmatched bracket (a password's, or a typo) was a traceback: "Invalid IPv6 URL".
        ({"REDIS_URL": "redis://:p]ss@host:6379/0"}, "has no host and port redis-py can read"),
        ({"WS_PUBLIC_URL": "wss://[::1"}, "WS_PUBLIC_URL must be a ws:// or wss:// URL"),
        ({"WS_ALLOWED_ORIGINS": "https://[::1"}, "WS_ALLOWED_ORIGINS entries must look like"),
        ({"SUPABASE_URL": "https://[x", "SUPABASE_SERVICE_ROLE_KEY": "k"}, "SUPABASE_URL must look like"),
        # Shorter, the send timeout left on a keep-alive socket would cut its next request's body, no 408.
        ({"HTTP_SEND_TIMEOUT_MS": "5000"}, "HTTP_SEND_TIMEOUT_MS (5000) must be at least HTTP_REQUEST_TIMEOUT_MS"),
        ({"HTTP_SEND_TIMEOUT_MS": "1000", "HTTP_REQUEST_TIMEOUT_MS": "2000"}, "must be at least"),
        # int() reads any script's digits: fullwidth 80, Arabic-Indic 12.
        ({"WS_PORT": "\uff18\uff10"}, "WS_PORT must be a whole number"),
        ({"WS_MAX_CLIENTS": "\u0661\u0662"}, "WS_MAX_CLIENTS must be a whole number"),
        ({"WS_TOKEN_TTL_MS": "86400001"}, "WS_TOKEN_TTL_MS must be between 1000 and 86400000"),
    ],
)
def test_bad_values_stop_start_up_with_a_message_naming_the_variable(tmp_path, env, fragment):
    with pytest.raises(ConfigError) as problem:
        Settings.from_env({**env, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert fragment in str(problem.value)


def test_a_refused_redis_url_is_shown_without_its_credentials(tmp_path):
    with pytest.raises(ConfigError) as problem:
        Settings.from_env(
            {"REDIS_URL": "http://u:pw1@redis:6379/0?password=pw2", "REALTIME_INSTANCE_PATH": str(tmp_path)}
        )
    assert "pw1" not in str(problem.value) and "pw2" not in str(problem.value)
    assert "'http://u:***@redis:6379/0?password=***'" in str(problem.value)
    with pytest.raises(ConfigError) as problem:  # a port that is not one is shown, not a traceback
        Settings.from_env({"REDIS_URL": "http://u:pw1@redis:abc/0", "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert "'http://u:***@redis:abc/0'" in str(problem.value)


@pytest.mark.parametrize("password", ["s3cr/et+Ab==", "pa#ss", "pa?ss", "123/abc", "ab@cd/ef"])
def test_a_password_a_url_parser_cannot_find_is_never_shown_nor_let_through(tmp_path, password):
    """A base64 password has '/', which ends a URL's host: parsed, it looked like the host and was shown,
    or (all digits before the '/') it was a port, and redis-py connected elsewhere."""
    url = f"redis://:{password}@redis.internal:6379/0"
    assert redacted(url) in ("redis://:***@redis.internal:6379/0", "redis://***")
    with pytest.raises(ConfigError) as problem:
        Settings.from_env({"REDIS_URL": url, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert password[:3] not in str(problem.value) and "percent-encode" in str(problem.value)
    encoded = f"redis://:{quote(password, safe='')}@redis.internal:6379/0"  # what the message says to do
    assert Settings.from_env({"REDIS_URL": encoded, "REALTIME_INSTANCE_PATH": str(tmp_path)}).redis_url == encoded
    assert redacted(encoded) == "redis://:***@redis.internal:6379/0"


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://user:p@ss@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://token@h/0", "redis://***@h/0"),  # a lone credential is a password to redis-py
        ("redis://h:6379/0?password=pw&db=1", "redis://h:6379/0?password=***&db=1"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        # An "@" only after "?" or "#": the end of a password holding one, or in the query: nothing shown
        ("redis://:pa?ss@h/0", "redis://***"),
        ("redis://h:6379/0?password=abc@defghijk", "redis://***"),
        # Not a URL (a mistyped scheme, found by an operator's run; a password pasted alone): none of it
        ("redis//:secretpw@127.0.0.1:6399", "***"),
        (":secretpw@127.0.0.1:6399", "***"),
        ("redis//:pw@h/0?password=xyz", "***"),
        ("s3cret", "***"),
    ],
)
def test_redacted_urls(url, shown):
    assert redacted(url) == shown


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:abc/0", "redis://[::1:6379/0"])
def test_a_bad_port_without_a_password_is_called_a_bad_port(tmp_path, url):
    with pytest.raises(ConfigError) as problem:
        Settings.from_env({"REDIS_URL": url, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert "the port as a number from 1 to 65535" in str(problem.value)
    assert "percent-encode" not in str(problem.value)  # there is no password (an operator's run)


def test_a_mistyped_scheme_is_refused_without_its_password(tmp_path):
    with pytest.raises(ConfigError) as problem:
        Settings.from_env({"REDIS_URL": "redis//:secretpw@127.0.0.1:6399", "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert "must start with redis://" in str(problem.value) and "secretpw" not in str(problem.value)


def test_settings_repr_never_shows_secrets(tmp_path):
    settings = Settings.from_env(prod_env(REALTIME_INSTANCE_PATH=str(tmp_path)))
    assert settings.token_secret == STRONG
    assert STRONG not in repr(settings)


def test_the_graceful_timeout_covers_the_drain_and_the_close(tmp_path):
    settings = Settings.from_env(
        {"WS_DRAIN_TIMEOUT_MS": "7500", "WS_CLOSE_TIMEOUT_MS": "2000", "REALTIME_INSTANCE_PATH": str(tmp_path)}
    )
    assert settings.shutdown_budget_s == 9.5
    assert settings.graceful_timeout_s >= 10


def test_the_previous_token_secret_follows_the_production_rules_and_must_differ(tmp_path):
    base = prod_env(REALTIME_INSTANCE_PATH=str(tmp_path))
    assert Settings.from_env({**base, "WS_TOKEN_SECRET_PREVIOUS": "p" * 40}).token_secret_previous == "p" * 40
    with pytest.raises(ConfigError, match="WS_TOKEN_SECRET_PREVIOUS is 8 bytes"):
        Settings.from_env({**base, "WS_TOKEN_SECRET_PREVIOUS": "short-pw"})
    with pytest.raises(ConfigError, match="same as WS_TOKEN_SECRET"):
        Settings.from_env({**base, "WS_TOKEN_SECRET_PREVIOUS": STRONG})


@pytest.mark.parametrize(
    "raw,level", [("debug", "DEBUG"), (" Warning ", "WARNING"), ("warn", "WARN"), ("ERROR", "ERROR")]
)
def test_log_level_takes_the_names_logging_knows_in_any_case(tmp_path, raw, level):
    settings = Settings.from_env({"LOG_LEVEL": raw, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert settings.log_level == level and not any("LOG_LEVEL" in w for w in settings.warnings)


@pytest.mark.parametrize("raw", ["verbose", "basic_format", "10"])
def test_a_log_level_logging_does_not_know_is_info_with_a_warning(tmp_path, raw):
    """basic_format is a name in the logging module, not a level: setLevel would have raised."""
    settings = Settings.from_env({"LOG_LEVEL": raw, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert settings.log_level == "INFO"
    assert any(f"LOG_LEVEL='{raw}' is not one of" in w for w in settings.warnings)


@pytest.mark.parametrize(
    "changes, public, told",
    [
        ({}, False, True),  # production, no token: the summary for all, and start-up says how to read more
        ({"METRICS_TOKEN": STRONG + "m"}, False, False),
        ({"HEALTH_PUBLIC": "1"}, True, False),
        ({"HEALTH_PUBLIC": "yes", "METRICS_TOKEN": STRONG + "m"}, True, False),
    ],
)
def test_health_public_is_off_unless_said_and_a_closed_report_is_noted(tmp_path, changes, public, told):
    settings = Settings.from_env({**prod_env(**changes), "REALTIME_INSTANCE_PATH": str(tmp_path)})
    assert settings.health_public is public
    assert any("/health answers its summary only" in notice for notice in settings.notices) is told


SUPABASE = {"SUPABASE_URL": "https://project.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": "service-key"}


def documented_durations() -> list[str]:
    """Every ``..._MS`` variable in the README's configuration table."""
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        names = re.findall(r"^\| `([A-Z_]+_MS)` \|", f.read(), flags=re.MULTILINE)
    assert len(names) >= 15, names  # the table's format changed: this test would check nothing
    return names


@pytest.mark.parametrize("name", documented_durations())
def test_every_duration_has_a_ceiling_and_takes_it(tmp_path, name):
    """A duration past its ceiling stops start-up; the ceiling itself starts. Without one, a last value's
    age of 10**20 ms was an OverflowError from SQLite on every trim, at run time."""
    ceiling = MAX_LAST_VALUE_TTL_MS if name == "WS_LAST_VALUE_TTL_MS" else DAY_MS
    base = {**SUPABASE, "REALTIME_INSTANCE_PATH": str(tmp_path)}
    with pytest.raises(ConfigError, match=f"{name} must be between .* and {ceiling}, got {ceiling + 1}"):
        Settings.from_env({**base, name: str(ceiling + 1)})
    if name == "HTTP_REQUEST_TIMEOUT_MS":  # the send timeout must be at least as long
        base["HTTP_SEND_TIMEOUT_MS"] = str(ceiling)
    settings = Settings.from_env({**base, name: str(ceiling)})
    attribute = name.lower().removeprefix("ws_")
    if attribute.startswith("supabase_"):
        assert getattr(settings.supabase, attribute.removeprefix("supabase_")) == ceiling
    else:
        assert getattr(settings, attribute) == ceiling


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "clinic-relay.internal"])
def test_development_by_default_is_not_served_to_the_network(tmp_path, host):
    """APP_ENV unset is development: generated secrets, WS_TEST_USER_ID's tokens for anyone, an open
    /metrics. A container's WS_HOST=0.0.0.0 without APP_ENV served all that to the network."""
    env = {"REALTIME_INSTANCE_PATH": str(tmp_path), "WS_HOST": host, "WS_TEST_USER_ID": "bob"}
    with pytest.raises(ConfigError, match="APP_ENV is not set"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "APP_ENV": "development"}).host == host  # on purpose: allowed
    assert Settings.from_env(prod_env(REALTIME_INSTANCE_PATH=str(tmp_path), WS_HOST=host)).host == host


@pytest.mark.parametrize(
    "host, address",
    [
        ("127.0.0.1", "127.0.0.1:3001"),
        ("127.0.0.2", "127.0.0.2:3001"),
        ("localhost", "localhost:3001"),
        ("::1", "[::1]:3001"),
        ("[::1]", "[::1]:3001"),
    ],
)
def test_development_on_this_machine_needs_no_app_env(tmp_path, host, address):
    """And the address gunicorn binds (and a URL names) puts an IPv6 host in brackets: "::1:3001" stopped it."""
    settings = Settings.from_env({"REALTIME_INSTANCE_PATH": str(tmp_path), "WS_HOST": host})
    assert settings.host == host and settings.address == address


def test_supabase_allowed_roles_are_read_as_a_set_and_a_malformed_one_is_refused(tmp_path):
    env = {
        "REALTIME_INSTANCE_PATH": str(tmp_path),
        "SUPABASE_URL": "https://project.supabase.co",
        "SUPABASE_SERVICE_ROLE_KEY": "service-key",
    }
    assert Settings.from_env(env).supabase.allowed_roles is None  # unset: any role, as the original
    allowed = Settings.from_env({**env, "SUPABASE_ALLOWED_ROLES": " admin, nurse ,sales_staff,"}).supabase
    assert allowed.allowed_roles == frozenset({"admin", "nurse", "sales_staff"})
    with pytest.raises(ConfigError, match="SUPABASE_ALLOWED_ROLES"):
        Settings.from_env({**env, "SUPABASE_ALLOWED_ROLES": "admin;nurse"})
    with pytest.raises(ConfigError, match="case-sensitive"):  # would lock the admins out
        Settings.from_env({**env, "SUPABASE_ALLOWED_ROLES": "Admin,nurse"})

"""Start-up configuration: secrets fail closed in production, are generated once in development."""

import json
import os
import stat

import pytest
import requests

from relay.config import ConfigError, Settings

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


@pytest.mark.parametrize("name", ["WS_TOKEN_SECRET", "WS_ADMIN_SECRET", "SECRET_KEY"])
@pytest.mark.parametrize("value", [None, "", "short-31-bytes-xxxxxxxxxxxxxxxx"], ids=["unset", "empty", "31-bytes"])
def test_production_refuses_missing_or_weak_secrets_naming_the_variable(start_server, name, value):
    overrides = prod_env(**{name: value})
    srv = start_server(wait=False, **overrides)
    code = srv.proc.wait(timeout=30)
    assert code != 0
    log = srv.log_text()
    assert f"cannot start: {name}" in log
    for secret in overrides.values():
        if secret and len(secret) >= 32:
            assert secret not in log


def test_production_starts_with_strong_secrets_and_ignores_the_test_user(start_server):
    srv = start_server(WS_TEST_USER_ID="bob", **prod_env())
    assert requests.get(srv.url + "/api/ws/auth", timeout=5).status_code == 401
    assert "WS_TEST_USER_ID is ignored because APP_ENV=production" in srv.log_text()
    assert srv.health()["env"] == "production"


def test_development_generates_secrets_once_with_mode_0600(tmp_path):
    env = {"APP_ENV": "development"}
    first = Settings.from_env(env, str(tmp_path))
    path = tmp_path / "dev-secrets.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["WS_TOKEN_SECRET"] == first.token_secret and len(first.token_secret) >= 32
    assert len({first.token_secret, first.admin_secret, first.secret_key}) == 3
    again = Settings.from_env(env, str(tmp_path))
    assert (again.token_secret, again.admin_secret, again.secret_key) == (
        first.token_secret,
        first.admin_secret,
        first.secret_key,
    )
    assert any(str(path) in notice for notice in first.notices)


def test_development_keeps_secrets_given_in_the_environment(tmp_path):
    settings = Settings.from_env({"WS_TOKEN_SECRET": STRONG}, str(tmp_path))
    assert settings.token_secret == STRONG
    assert "WS_TOKEN_SECRET" not in json.loads((tmp_path / "dev-secrets.json").read_text())


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"WS_PORT": "eighty"}, "WS_PORT must be a whole number"),
        ({"WS_PORT": "70000"}, "WS_PORT must be between"),
        ({"WS_TOKEN_TTL_MS": "-5"}, "WS_TOKEN_TTL_MS"),
        ({"WS_PUBLIC_URL": "http://example.com"}, "WS_PUBLIC_URL must be a ws:// or wss:// URL"),
        ({"WS_ALLOWED_ORIGINS": "example.com"}, "WS_ALLOWED_ORIGINS"),
    ],
)
def test_bad_values_stop_start_up_with_a_message_naming_the_variable(tmp_path, env, fragment):
    with pytest.raises(ConfigError) as problem:
        Settings.from_env(env, str(tmp_path))
    assert fragment in str(problem.value)


def test_settings_repr_never_shows_secrets(tmp_path):
    settings = Settings.from_env(prod_env(), str(tmp_path))
    assert settings.token_secret == STRONG
    assert STRONG not in repr(settings)


def test_preload_is_refused_because_greenlets_belong_to_workers(start_server):
    srv = start_server("--preload", wait=False)
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: preload_app is not supported" in srv.log_text()

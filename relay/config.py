"""Settings: the environment, read once, validated, frozen.

Everything configurable lives in :class:`Settings`. It is built by
:meth:`Settings.from_env` (in ``create_app``, and in ``gunicorn.conf.py`` for
the server's own values) and handed to services as plain values; no code
reads ``os.environ`` after that.

Reading settings never writes anything. Secrets fail closed: in production a
missing or short secret stops start-up with a message naming the variable. In
development a missing secret is taken from the instance folder's
``dev-secrets.json``, which only the serving process creates
(:func:`prepare_instance`, called by ``gunicorn.conf.py`` and ``wsgi.py``), so
a command run before the first start simply has no secret, and any step that
needs one says so.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit

from .channels import ADMIN_ROLE, is_valid_role

MIN_SECRET_BYTES = 32
SECRET_NAMES = ("WS_TOKEN_SECRET", "WS_ADMIN_SECRET", "SECRET_KEY")
OPTIONAL_SECRET_NAMES = ("WS_TOKEN_SECRET_PREVIOUS",)  # checked like the others when given
DEV_SECRETS_FILE = "dev-secrets.json"
SOCKET_PATH = "/ws"
# The project's own instance folder: where Flask would put it for app.py.
DEFAULT_INSTANCE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "instance")
# What gunicorn gets on top of the drain and the closing handshakes before it may kill a worker.
GRACEFUL_MARGIN_S = 5
# SESSION_LIFETIME_HOURS's ceiling. A sign-out is remembered this long after its sign-in, so that
# raising the lifetime later cannot bring a signed-out session back (blueprints/auth.py: logout).
MAX_SESSION_HOURS = 720
# Every duration's ceiling: far past any sensible value, and well inside what the stores and timers
# take (a last value's age past 2**63 ms was an OverflowError from SQLite on every trim, and an
# error from Redis's PEXPIRE on every broadcast, at run time rather than at start-up).
DAY_MS = 86_400_000
MAX_LAST_VALUE_TTL_MS = 365 * DAY_MS


class ConfigError(Exception):
    """The environment cannot start the service; the message says how to fix it."""


@dataclass(frozen=True)
class Settings:
    app_env: str
    host: str
    port: int
    # None only in development before the server's first start (see prepare_instance).
    token_secret: str | None = field(repr=False)
    token_secret_previous: str | None = field(repr=False)
    admin_secret: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)
    token_ttl_ms: int
    public_url: str | None
    test_user_id: str | None
    ping_interval_ms: int
    client_idle_ms: int
    client_pong_timeout_ms: int
    db_path: str
    redis_url: str | None = field(repr=False)
    redis_prefix: str
    redis_heartbeat_ms: int
    redis_reply_timeout_ms: int
    supabase: SupabaseSettings | None
    allowed_origins: tuple[str, ...]
    max_clients: int
    max_queue_bytes: int
    close_timeout_ms: int
    drain_timeout_ms: int
    instance_path: str
    log_level: str
    web_concurrency: int
    worker_connections: int
    http_request_timeout_ms: int
    http_send_timeout_ms: int  # how long one write of an answer may wait on a client that does not read
    identity_recheck_ms: int
    max_connections_per_user: int
    trusted_proxies: int  # reverse proxies in front that append X-Forwarded-For / -Proto
    # The delivery guarantee (relay.history); a window of 0 turns it off.
    history_db_path: str
    recovery_window_ms: int
    recovery_max_messages: int
    last_value_ttl_ms: int
    # Operations: /metrics access, and how long the broadcast log keeps a row.
    metrics_token: str | None = field(repr=False)
    metrics_public: bool
    # /health's full report for everyone (production: otherwise only with the metrics token).
    health_public: bool
    broadcast_log_days: int
    # How long a sign-in lasts (the admin pages' session cookie), in seconds.
    session_lifetime_s: int
    # What start-up should tell the operator once it can log.
    notices: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def recovery(self) -> bool:
        """Whether broadcasts get offsets and clients can resume (WS_RECOVERY_WINDOW_MS > 0)."""
        return self.recovery_window_ms > 0

    @property
    def shutdown_budget_s(self) -> float:
        """The longest a stopping worker may need: the drain, then the last closing handshakes."""
        return (self.drain_timeout_ms + self.close_timeout_ms) / 1000

    @property
    def address(self) -> str:
        """``host:port`` as gunicorn's bind and a URL write it: an IPv6 address in brackets (``[::1]:3001``)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def graceful_timeout_s(self) -> int:
        """gunicorn's ``graceful_timeout``: the shutdown budget plus a margin, whole seconds."""
        return math.ceil(self.shutdown_budget_s) + GRACEFUL_MARGIN_S

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping (``os.environ`` plus overrides). Writes nothing."""
        reader = _Reader(env)
        app_env = reader.text("APP_ENV", "development").lower()
        if app_env not in ("development", "production"):
            raise ConfigError(f"APP_ENV must be 'development' or 'production', got {app_env!r}.")
        production = app_env == "production"
        instance_path = instance_path_of(env)
        notices: list[str] = []
        warnings: list[str] = []

        found: dict[str, str | None] = {name: reader.text(name, "") or None for name in SECRET_NAMES}
        previous = reader.text("WS_TOKEN_SECRET_PREVIOUS", "") or None
        metrics_token = reader.text("METRICS_TOKEN", "") or None
        if production:  # every one at once, the optional ones given too: not one restart per problem
            given = [
                (name, value)
                for name, value in (("WS_TOKEN_SECRET_PREVIOUS", previous), ("METRICS_TOKEN", metrics_token))
                if value
            ]
            _require_strong(*found.items(), *given)
        else:
            missing = [name for name, value in found.items() if not value]
            if missing:
                path = os.path.join(instance_path, DEV_SECRETS_FILE)
                stored = _read_secrets(path) or {}
                found.update({name: stored.get(name) or None for name in missing})
                if all(found[name] for name in missing):
                    notices.append(f"development secrets for {', '.join(missing)} are read from {path}")
                else:
                    absent = [name for name in missing if not found[name]]
                    notices.append(
                        f"{', '.join(absent)} not set and not in {path} yet: the server creates them on its "
                        "first start (make run); commands that need them will say so"
                    )
            for name, secret in found.items():
                if secret and _too_short(secret):
                    warnings.append(
                        f"{name} is {len(secret.encode())} bytes; production will refuse "
                        f"anything under {MIN_SECRET_BYTES}"
                    )

        if previous is not None:
            if previous == found["WS_TOKEN_SECRET"]:
                raise ConfigError("WS_TOKEN_SECRET_PREVIOUS is the same as WS_TOKEN_SECRET: set a new WS_TOKEN_SECRET.")

        metrics_public = reader.text("METRICS_PUBLIC", "0").lower() in ("1", "true", "yes")
        if production and metrics_token is None and not metrics_public:
            notices.append("/metrics is closed: set METRICS_TOKEN (or METRICS_PUBLIC=1 behind a private network)")
        health_public = reader.text("HEALTH_PUBLIC", "0").lower() in ("1", "true", "yes")
        if production and metrics_token is None and not health_public:
            notices.append(
                "/health answers its summary only: set METRICS_TOKEN to read the full report "
                "(or HEALTH_PUBLIC=1 behind a private network)"
            )

        test_user_id = reader.text("WS_TEST_USER_ID", "") or None
        if test_user_id and production:
            warnings.append("WS_TEST_USER_ID is ignored because APP_ENV=production")
            test_user_id = None

        host = reader.text("WS_HOST", "127.0.0.1")
        if not production and not reader.text("APP_ENV", "") and not _is_loopback(host):
            # Development's conveniences (generated secrets, WS_TEST_USER_ID's tokens for anyone, an open
            # /metrics and full /health) must not reach a network by default: saying so is a choice.
            raise ConfigError(
                f"WS_HOST={host} serves beyond this machine, and APP_ENV is not set: set APP_ENV=production, "
                "or APP_ENV=development to serve development mode to the network on purpose."
            )

        request_timeout_ms = reader.integer("HTTP_REQUEST_TIMEOUT_MS", 10_000, low=100, high=DAY_MS)
        send_timeout_ms = reader.integer("HTTP_SEND_TIMEOUT_MS", 30_000, low=100, high=DAY_MS)
        if send_timeout_ms < request_timeout_ms:
            # The send timeout stays on the socket for the keep-alive wait and the next request's body,
            # which HTTP_REQUEST_TIMEOUT_MS bounds: shorter, it would cut those instead (with no 408).
            raise ConfigError(
                f"HTTP_SEND_TIMEOUT_MS ({send_timeout_ms}) must be at least HTTP_REQUEST_TIMEOUT_MS "
                f"({request_timeout_ms}): raise it, or lower HTTP_REQUEST_TIMEOUT_MS."
            )

        return cls(
            app_env=app_env,
            host=host,
            port=reader.integer("WS_PORT", 3001, low=1, high=65535),
            token_secret=found["WS_TOKEN_SECRET"],
            token_secret_previous=previous,
            admin_secret=found["WS_ADMIN_SECRET"],
            secret_key=found["SECRET_KEY"],
            token_ttl_ms=reader.integer("WS_TOKEN_TTL_MS", 600_000, low=1000, high=DAY_MS),
            public_url=_public_url(reader),
            test_user_id=test_user_id,
            ping_interval_ms=reader.integer("WS_PING_INTERVAL_MS", 30_000, low=50, high=DAY_MS),
            client_idle_ms=reader.integer("WS_CLIENT_IDLE_MS", 25_000, low=100, high=DAY_MS),
            client_pong_timeout_ms=reader.integer("WS_CLIENT_PONG_TIMEOUT_MS", 10_000, low=100, high=DAY_MS),
            db_path=reader.text("REALTIME_DB", "") or os.path.join(instance_path, "realtime.db"),
            redis_url=_redis_url(reader.text("REDIS_URL", "")),
            redis_prefix=reader.text("REDIS_PREFIX", "relay") or "relay",
            redis_heartbeat_ms=reader.integer("REDIS_HEARTBEAT_MS", 1000, low=100, high=DAY_MS),
            redis_reply_timeout_ms=reader.integer("REDIS_REPLY_TIMEOUT_MS", 1000, low=10, high=DAY_MS),
            supabase=_supabase(reader),
            allowed_origins=_origins(reader.text("WS_ALLOWED_ORIGINS", ""), production, warnings),
            max_clients=reader.integer("WS_MAX_CLIENTS", 11_000, low=1),
            max_queue_bytes=reader.integer("WS_MAX_QUEUE_BYTES", 1 << 20, low=64 * 1024),
            close_timeout_ms=reader.integer("WS_CLOSE_TIMEOUT_MS", 2000, low=10, high=DAY_MS),
            drain_timeout_ms=reader.integer("WS_DRAIN_TIMEOUT_MS", 5000, low=100, high=DAY_MS),
            instance_path=instance_path,
            log_level=_log_level(reader.text("LOG_LEVEL", "INFO"), warnings),
            web_concurrency=reader.integer("WEB_CONCURRENCY", 1, low=1, high=256),
            worker_connections=reader.integer("WS_WORKER_CONNECTIONS", 12_000, low=10),
            http_request_timeout_ms=request_timeout_ms,
            http_send_timeout_ms=send_timeout_ms,
            identity_recheck_ms=reader.integer("WS_IDENTITY_RECHECK_MS", 30_000, low=100, high=DAY_MS),
            max_connections_per_user=reader.integer("WS_MAX_CONNECTIONS_PER_USER", 20, low=1),
            trusted_proxies=reader.integer("TRUSTED_PROXIES", 0, low=0, high=5),
            history_db_path=reader.text("REALTIME_HISTORY_DB", "") or os.path.join(instance_path, "history.db"),
            recovery_window_ms=reader.integer("WS_RECOVERY_WINDOW_MS", 120_000, low=0, high=DAY_MS),
            recovery_max_messages=reader.integer("WS_RECOVERY_MAX_MESSAGES", 1000, low=1, high=100_000),
            last_value_ttl_ms=reader.integer("WS_LAST_VALUE_TTL_MS", 86_400_000, low=1000, high=MAX_LAST_VALUE_TTL_MS),
            metrics_token=metrics_token,
            metrics_public=metrics_public,
            health_public=health_public,
            broadcast_log_days=reader.integer("BROADCAST_LOG_DAYS", 30, low=1, high=3650),
            session_lifetime_s=reader.integer("SESSION_LIFETIME_HOURS", 12, low=1, high=MAX_SESSION_HOURS) * 3600,
            notices=tuple(notices),
            warnings=tuple(warnings),
        )


def instance_path_of(env: Mapping[str, str]) -> str:
    """The instance folder: ``REALTIME_INSTANCE_PATH``, or ``instance/`` in the project (absolute)."""
    return os.path.abspath(str(env.get("REALTIME_INSTANCE_PATH") or "").strip() or DEFAULT_INSTANCE_PATH)


def prepare_instance(env: Mapping[str, str]) -> list[str]:
    """What the serving process does once before it reads its settings, in development only:
    create the instance folder and generate the secrets the environment does not give.

    Idempotent and safe when several processes start at once. Returns notices for the log.
    In production it does nothing: secrets come from the environment, or start-up stops.
    """
    if str(env.get("APP_ENV") or "development").strip().lower() == "production":
        return []
    instance_path = instance_path_of(env)
    os.makedirs(instance_path, exist_ok=True)
    missing = [name for name in SECRET_NAMES if not str(env.get(name) or "").strip()]
    if not missing:
        return []
    path = os.path.join(instance_path, DEV_SECRETS_FILE)
    created = _create_dev_secrets(path, missing)
    return [f"generated development secrets for {', '.join(created)} in {path} (mode 0600)"] if created else []


@dataclass(frozen=True)
class SupabaseSettings:
    """Where users live in production (set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)."""

    url: str
    service_key: str = field(repr=False)
    anon_key: str | None = field(repr=False)
    jwt_secret: str | None = field(repr=False)
    jwt_audience: str
    profiles_table: str
    columns: tuple[str, str, str]  # id, role, clinic id
    timeout_ms: int
    cache_ttl_ms: int
    cache_size: int
    broadcast_log_table: str = "broadcast_log"
    allowed_roles: frozenset[str] | None = None  # None: any role (the original's rule)


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name)
        return default if value is None else str(value).strip()

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        raw = self.text(name, "")
        if raw == "":
            return default
        try:
            if not raw.isascii():  # int() also reads other scripts' digits ("١٢"): a typo more likely than meant
                raise ValueError(raw)
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}.") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{name} must be {bounds}, got {value}.")
        return value


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or 0.0.0.0's kin: reachable from elsewhere, as far as we know


def _require_strong(*named: tuple[str, str | None]) -> None:
    """Refuse, naming every one of ``(name, value)`` that is not set or too short, in one message."""
    missing = [name for name, value in named if not value]
    short = [f"{name} is {len(value.encode())} bytes" for name, value in named if value and _too_short(value)]
    problems = []
    if missing:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        problems.append(
            f"{names} {'are' if len(missing) > 1 else 'is'} not set; production needs "
            f"{'secrets' if len(missing) > 1 else 'a secret'} of at least {MIN_SECRET_BYTES} bytes "
            f"(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')."
        )
    if short:
        problems.append(
            f"{'; '.join(short)}; production needs at least {MIN_SECRET_BYTES} — set "
            f"{'longer values' if len(short) > 1 else 'a longer value'} in the environment."
        )
    if problems:
        raise ConfigError(" ".join(problems))


def _too_short(value: str) -> bool:
    return len(value.encode()) < MIN_SECRET_BYTES


def _create_dev_secrets(path: str, names: list[str]) -> list[str]:
    """Add any of ``names`` missing from the secrets file at ``path``; returns the names it generated.

    Several gunicorn workers may start at once: the file is created with
    O_EXCL so exactly one of them writes it, and the others read what it wrote.
    """
    for _ in range(50):
        stored = _read_secrets(path)
        absent = [name for name in names if not (stored or {}).get(name)]
        if not absent:
            return []
        merged = {**(stored or {}), **{name: secrets.token_urlsafe(48) for name in absent}}
        if stored is None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                time.sleep(0.01)  # another worker won the race; read what it wrote once it has
                continue
        else:
            fd = os.open(f"{path}.{os.getpid()}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(merged, out, indent=2)
        if stored is not None:
            os.replace(f"{path}.{os.getpid()}.tmp", path)
        return absent
    raise ConfigError(f"could not read or create development secrets at {path}")


def _read_secrets(path: str) -> dict[str, str] | None:
    try:
        with open(path) as src:
            text = src.read()
    except FileNotFoundError:
        return None
    if not text.strip():
        return None  # being written by another worker right now
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object; delete it to generate new secrets")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _public_url(reader: _Reader) -> str | None:
    name = "WS_PUBLIC_URL" if reader.text("WS_PUBLIC_URL", "") else "NEXT_PUBLIC_WS_URL"
    raw = reader.text(name, "")
    if not raw:
        return None
    parts = _split(raw)
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"{name} must be a ws:// or wss:// URL, got {raw!r}.")
    path = parts.path.rstrip("/")
    if not path.endswith(SOCKET_PATH):
        path += SOCKET_PATH
    return f"{parts.scheme}://{parts.netloc}{path}"


def _supabase(reader: _Reader) -> SupabaseSettings | None:
    url = reader.text("SUPABASE_URL", "")
    key = reader.text("SUPABASE_SERVICE_ROLE_KEY", "")
    if not url and not key:
        return None
    if not url or not key:
        missing = "SUPABASE_URL" if not url else "SUPABASE_SERVICE_ROLE_KEY"
        raise ConfigError(f"{missing} is not set; Supabase needs both SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY.")
    parts = _split(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"SUPABASE_URL must look like https://<project>.supabase.co, got {url!r}.")
    table = reader.text("SUPABASE_PROFILES_TABLE", "profiles")
    log_table = reader.text("SUPABASE_BROADCAST_LOG_TABLE", "broadcast_log")
    columns = (
        reader.text("SUPABASE_PROFILE_ID_COLUMN", "id"),
        reader.text("SUPABASE_PROFILE_ROLE_COLUMN", "role"),
        reader.text("SUPABASE_PROFILE_CLINIC_COLUMN", "clinic_id"),
    )
    for name in (table, log_table, *columns):
        if not name.replace("_", "").isalnum():
            raise ConfigError(f"Supabase table and column names must be letters, digits and _, got {name!r}.")
    roles = [role.strip() for role in reader.text("SUPABASE_ALLOWED_ROLES", "").split(",") if role.strip()]
    for role in roles:
        if not is_valid_role(role):
            raise ConfigError(f"SUPABASE_ALLOWED_ROLES must be role names separated by commas, got {role!r}.")
        if role.lower() == ADMIN_ROLE and role != ADMIN_ROLE:  # would admit nobody's admin, and lock admins out
            raise ConfigError(
                f"SUPABASE_ALLOWED_ROLES: roles are case-sensitive, and admins are {ADMIN_ROLE!r}, not {role!r}."
            )
    return SupabaseSettings(
        url=url.rstrip("/"),
        service_key=key,
        anon_key=reader.text("SUPABASE_ANON_KEY", "") or None,
        jwt_secret=reader.text("SUPABASE_JWT_SECRET", "") or None,
        jwt_audience=reader.text("SUPABASE_JWT_AUDIENCE", "authenticated"),
        profiles_table=table,
        columns=columns,
        timeout_ms=reader.integer("SUPABASE_TIMEOUT_MS", 3000, low=10, high=DAY_MS),
        cache_ttl_ms=reader.integer("SUPABASE_CACHE_TTL_MS", 60_000, low=0, high=DAY_MS),
        cache_size=reader.integer("SUPABASE_CACHE_SIZE", 10_000, low=1),
        broadcast_log_table=log_table,
        allowed_roles=frozenset(roles) or None,
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")


def _log_level(raw: str, warnings: list[str]) -> str:
    """A level the logging module names (a typo is INFO, said at start-up, not a crash or silence)."""
    level = raw.strip().upper()
    if level in LOG_LEVELS:
        return level
    warnings.append(f"LOG_LEVEL={raw[:40]!r} is not one of {', '.join(LOG_LEVELS)}: logging at INFO")
    return "INFO"


REDIS_URL_HINT = "percent-encode a '/', '#', '?', '@', '[' or ']' in the password (a '/' as %2F)"


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or None where it raises (an unmatched "[" or "]": "Invalid IPv6 URL")."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _redis_url(raw: str) -> str | None:
    if not raw:
        return None
    parts = _split(raw)
    if parts is None:  # a "[" or "]" of the password, taken for an IPv6 address's
        raise ConfigError(f"REDIS_URL={redacted(raw)} has no host and port redis-py can read: {url_hint(raw)}.")
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {redacted(raw)!r}.")
    try:
        _ = parts.port  # what redis-py reads too: it would fail later, quoting part of the password
        # A password with an unescaped delimiter moves the host a parser finds (redis-py's included) away
        # from the one written after the last "@": it would connect there, and its errors name that "host".
        readable = parts.scheme == "unix" or parts.netloc.rpartition("@")[2] == _written_host(raw)
    except ValueError:
        readable = False
    if not readable:
        raise ConfigError(f"REDIS_URL={redacted(raw)} has no host and port redis-py can read: {url_hint(raw)}.")
    return raw


def url_hint(raw: str) -> str:
    """What to do about a REDIS_URL whose host and port cannot be read: percent-encode the password's
    delimiters when there is a password; otherwise the host or port itself is what is wrong."""
    return (
        REDIS_URL_HINT
        if "@" in raw
        else "write the host as a name or address (an IPv6 one in [ ]) and the port as a number from 1 to 65535"
    )


def _written_host(url: str) -> str:
    """The host (and port) as written: after the last "@" before any "?" or "#", up to the path."""
    return _before_query(url.partition("://")[2]).rpartition("@")[2].partition("/")[0]


def _before_query(rest: str) -> str:
    """What comes after ``scheme://`` up to the first ``?`` or ``#``: the credentials, host and path."""
    return re.split(r"[?#]", rest, maxsplit=1)[0]


def redacted(url: str) -> str:
    """The URL without its password, fit for logs and /health.

    The credentials are everything between ``://`` and the last ``@``, found
    without parsing: a password with an unescaped ``/`` (base64 ones have
    them) is not one to a URL parser, which would show it as part of the
    host. An ``@`` only after a ``?`` or ``#`` may end a password holding one
    of those or sit in the query: nothing after the scheme is shown then.
    redis-py also takes the credentials from the query string
    (``redis://host/0?password=pw``): those are masked too, and so is
    anything else there that names one.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL (a scheme mistyped, "redis//:pw@host", or a password pasted alone): none of it
        return "***"
    shown = scheme + sep
    if sep and "@" in rest:
        authority = _before_query(rest)
        if "@" not in authority:
            return shown + "***"
        credentials, _, after = authority.rpartition("@")
        user, colon, _ = credentials.partition(":")
        shown += f"{user}:***@" if colon else "***@"
        rest = after + rest[len(authority) :]
    base, mark, query = rest.partition("?")
    if query:
        pairs = [(key, "***" if _names_a_credential(key) else value) for key, value in parse_qsl(query, True)]
        query = urlencode(pairs, safe="*")
    return shown + base + mark + query


def _names_a_credential(key: str) -> bool:
    return any(word in key.lower() for word in ("password", "user", "secret", "token", "key"))


def _origins(raw: str, production: bool, warnings: list[str]) -> tuple[str, ...]:
    origins = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        if item == "*":
            if production:
                raise ConfigError(
                    "WS_ALLOWED_ORIGINS=* would let every web site open sockets here and fetch tokens from "
                    "/api/ws/auth; production refuses it. List the origins: https://app.example.com,https://..."
                )
            warnings.append("WS_ALLOWED_ORIGINS=* lets pages of any origin open sockets (development only)")
            origins.append("*")
            continue
        parts = _split(item)
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(f"WS_ALLOWED_ORIGINS entries must look like https://app.example.com, got {item!r}.")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)

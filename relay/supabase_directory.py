"""SupabaseDirectory: users from a Supabase project, through the official client.

Who a user is comes from two places, as in the original system:

- the auth user (admin API, service-role key): existence, email, ban state;
- a profiles table (``SUPABASE_PROFILES_TABLE``, columns configurable) for
  role and clinic, falling back to the auth user's ``app_metadata`` (``role``,
  ``clinic_id``) where the table has no row or a null value.

Every lookup is cached per user for ``cache_ttl`` (unknown users too), the
cache is bounded, and concurrent lookups of one user share one request, so
a reconnect storm does not become a Supabase storm. Every call is bounded by
``timeout`` (httpx's own timeouts plus a hard ``gevent.Timeout``), and all I/O
is gevent-cooperative. A Supabase that fails or does not answer raises
:class:`DirectoryUnavailable` (sockets get 1013, not 4403); that is never cached.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import OrderedDict

import gevent
import gevent.lock
from gevent.event import AsyncResult

from .config import ConfigError
from .directory import AccessTokenInvalid, AccessTokenOwner, DirectoryUnavailable, Identity
from .eventlog import event

try:
    import httpx
    import jwt
    from postgrest.exceptions import APIError
    from supabase import ClientOptions, create_client
    from supabase_auth.errors import AuthApiError, AuthError
    from supabase_auth.types import User

    HAVE_SUPABASE = True
except ImportError:  # pragma: no cover - exercised only without the extra installed
    HAVE_SUPABASE = False

log = logging.getLogger("relay.supabase")
DEFAULT_ROLE = "user"  # least privilege when neither the profile nor app_metadata names a role
LIST_PAGE = 1000  # auth users per admin-API page when re-checking many at once
MAX_LIST_PAGES = 200  # at most 200,000 users listed per re-check
# Connected users a cut-short list did not reach (a project of more users than that: staff beside a
# patient app's accounts) are asked by id, at most this many a re-check, the least recently refreshed
# first: the next re-checks take the others. ~50 ms each, one after another.
MAX_ASKED_ONE_BY_ONE = 100
PROFILE_BATCH = 100  # ids per PostgREST "in" query (kept well under URL limits)
# Supabase's access tokens are 1-2 KB; a longer one is refused here, not sent on to be refused by a gateway.
MAX_ACCESS_TOKEN_CHARS = 4096
# Access tokens Supabase checks for this worker at once (without SUPABASE_JWT_SECRET). Anyone can send
# one, and each is a call on the HTTP client the identity lookups share: a flood of junk tokens must not
# take its connections (100) from the sockets and pages being admitted. Past this, a request waits for a
# turn, up to the timeout, then is answered 503.
MAX_TOKEN_CHECKS = 8


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False


class SupabaseDirectory:
    name = "supabase"
    recheck_batch = 1_000_000  # everyone connected in one get_many: its user list is read once per re-check

    def __init__(
        self,
        url: str,
        service_key: str,
        *,
        timeout: float = 3.0,
        cache_ttl: float = 60.0,
        cache_size: int = 10_000,
        profiles_table: str = "profiles",
        columns: tuple[str, str, str] = ("id", "role", "clinic_id"),
        anon_key: str | None = None,
        jwt_secret: str | None = None,
        jwt_audience: str = "authenticated",
        allowed_roles: frozenset[str] | None = None,
    ):
        if not HAVE_SUPABASE:
            raise ConfigError("SUPABASE_URL is set but the supabase package is missing: pip install '.[supabase]'")
        self.url = url
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.profiles_table = profiles_table
        self.id_column, self.role_column, self.clinic_column = columns
        self._service_key = service_key
        self._sign_in_key = anon_key or service_key
        self._jwt_secret = jwt_secret
        self._jwt_audience = jwt_audience
        self.allowed_roles = allowed_roles  # None: any role; else a user of another role is not active
        # One httpx client shared by auth and PostgREST: our timeout, no PostgREST retries
        # (its defaults are 120 s and three retries with sleeps).
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)))
        self._admin = create_client(url, service_key, options=self._options())
        # user -> (expires, identity, the number of the read that found it: see _remember)
        self._cache: OrderedDict[str, tuple[float, Identity | None, int]] = OrderedDict()
        self._reads = 0
        self._inflight: dict[str, AsyncResult] = {}
        self._token_checks = gevent.lock.BoundedSemaphore(MAX_TOKEN_CHECKS)
        self.stats = {"hits": 0, "misses": 0, "upstream": 0, "errors": 0}
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._failing = False

    def _options(self) -> ClientOptions:
        return ClientOptions(
            httpx_client=self._http, postgrest_client_retry=False, auto_refresh_token=False, persist_session=False
        )

    # -- the Directory interface ----------------------------------------------------------

    def get(self, user_id: str) -> Identity | None:
        if not is_uuid(user_id):
            return None  # Supabase ids are UUIDs: anything else is nobody (and is never sent upstream)
        user_id = user_id.lower()  # the spelling Supabase answers with (an operator may type capitals)
        cached = self._cache.get(user_id)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(user_id)
            self.stats["hits"] += 1
            return cached[1]
        pending = self._inflight.get(user_id)
        if pending is not None:
            self.stats["hits"] += 1
            try:
                return pending.get(timeout=self.timeout + 1)  # someone is already asking: share the answer
            except gevent.Timeout:
                raise self._late() from None
        self.stats["misses"] += 1
        pending = self._inflight[user_id] = AsyncResult()
        began = self._read_begins()
        try:
            identity = self.fetch(user_id)
        except DirectoryUnavailable as down:
            pending.set_exception(down)
            raise
        else:
            identity = self._remember(user_id, identity, began)
            pending.set(identity)
            return identity
        finally:
            del self._inflight[user_id]

    def authenticate(self, login: str, password: str) -> Identity | None:
        """Sign in with Supabase Auth (email and password)."""
        # A client of its own: signing in rewrites a client's Authorization header,
        # which must never happen to the service-role client.
        client = create_client(self.url, self._sign_in_key, options=self._options())
        try:
            with self._deadline():
                result = client.auth.sign_in_with_password({"email": login, "password": password})
        except (AuthError, httpx.HTTPError, OSError, ValueError) as problem:
            if _refused(problem) is not None:
                return None
            raise self._unavailable(problem) from None
        self._up()
        if result.user is None:
            return None
        identity = self.get(result.user.id)
        return identity if identity is not None and identity.active else None

    def account_of(self, login: str) -> str:
        """Supabase signs in by email only, which it compares without case: the email is the account."""
        return login

    def user_for_access_token(self, token: str) -> AccessTokenOwner:
        """The user of a Supabase access token (JWT), verified locally or by Supabase, with its ``iat``."""
        if not token.isascii():  # a JWT is ASCII; httpx would refuse to put anything else in a header
            raise AccessTokenInvalid("the access token is malformed")
        if len(token) > MAX_ACCESS_TOKEN_CHARS:
            raise AccessTokenInvalid(f"the access token is over {MAX_ACCESS_TOKEN_CHARS} characters")
        if self._jwt_secret:
            try:
                claims = jwt.decode(
                    token,
                    self._jwt_secret,
                    algorithms=["HS256"],
                    audience=self._jwt_audience,
                    options={"require": ["exp", "sub"]},
                )
            except jwt.ExpiredSignatureError:
                raise AccessTokenInvalid("the access token has expired") from None
            except jwt.InvalidTokenError as bad:
                raise AccessTokenInvalid(f"the access token is invalid: {bad}") from None
            return AccessTokenOwner(str(claims["sub"]), _issued_ms(claims))
        if not self._token_checks.acquire(timeout=self.timeout):
            raise DirectoryUnavailable(f"over {MAX_TOKEN_CHECKS} access tokens are being checked; try again shortly")
        try:
            with self._deadline():
                response = self._admin.auth.get_user(token)
        except (AuthError, httpx.HTTPError, OSError, ValueError) as problem:
            status = _refused(problem)
            if status is not None:
                raise AccessTokenInvalid(f"Supabase refused the access token (HTTP {status})") from None
            raise self._unavailable(problem) from None
        finally:
            self._token_checks.release()
        self._up()
        if response is None or response.user is None:
            raise AccessTokenInvalid("Supabase knows no user for this access token")
        try:  # Supabase has verified it: its claims are read, not checked again
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            claims = {}
        return AccessTokenOwner(response.user.id, _issued_ms(claims))

    def status(self) -> dict:
        return {
            "kind": self.name,
            "state": "degraded" if self._failing else "ok",
            "url": self.url,
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
            "cache": {"size": len(self._cache), "ttlMs": int(self.cache_ttl * 1000), **self.stats},
        }

    # -- lookups -------------------------------------------------------------------------------

    def fetch(self, user_id: str) -> Identity | None:
        """Ask Supabase (no cache): the auth user, then the profile row."""
        self.stats["upstream"] += 1
        try:
            with self._deadline():
                try:
                    user = self._admin.auth.admin.get_user_by_id(user_id).user
                except AuthApiError as refused:
                    if refused.status == 404:
                        self._up()
                        return None
                    raise
                rows = (
                    self._admin.table(self.profiles_table)
                    .select(f"{self.id_column},{self.role_column},{self.clinic_column}")
                    .eq(self.id_column, user_id)
                    .limit(1)
                    .execute()
                    .data
                )
        except DirectoryUnavailable as down:
            raise self._unavailable(down) from None
        except (AuthError, APIError, httpx.HTTPError, OSError, ValueError) as problem:
            raise self._unavailable(problem) from None
        self._up()
        return self._identity(user, rows[0] if rows and isinstance(rows[0], dict) else {})

    def project_warnings(self) -> list[str]:
        """What in the project's auth settings lets people connect who should not (``flask ws identity check``).

        Reads ``GET /auth/v1/settings``. Raises DirectoryUnavailable.
        """
        try:
            with self._deadline():
                reply = self._http.get(f"{self.url}/auth/v1/settings", headers={"apikey": self._sign_in_key})
            reply.raise_for_status()
            settings = reply.json()
        except DirectoryUnavailable:
            raise
        except (httpx.HTTPError, OSError, ValueError) as problem:
            raise DirectoryUnavailable(f"the project's auth settings could not be read: {problem}") from None
        warnings = []
        signups = isinstance(settings, dict) and not settings.get("disable_signup")
        if signups and (self.allowed_roles is None or DEFAULT_ROLE in self.allowed_roles):
            allowed = "is not set" if self.allowed_roles is None else f"admits {DEFAULT_ROLE!r}"
            warnings.append(
                f"sign-ups are open in this project and SUPABASE_ALLOWED_ROLES {allowed}: anyone who signs up "
                f"can connect (role {DEFAULT_ROLE!r}: the system channels and every unfiltered broadcast). Turn "
                "sign-ups off, or list only the staff's roles in SUPABASE_ALLOWED_ROLES."
            )
        return warnings

    def get_many(self, user_ids: list[str]) -> dict[str, Identity | None]:
        """Many users at once, fresh (the cache is refreshed with them): what the periodic re-check asks.

        Supabase's admin API has no lookup by a list of ids, so the auth users
        are listed a page of ``LIST_PAGE`` at a time (stopping once every id was
        seen), and the profiles read ``PROFILE_BATCH`` ids per request: a few
        calls for thousands of users, not one each. A user is reported gone
        only when the whole list was read without it, or asked by id and not
        found. Those a list cut short at ``MAX_LIST_PAGES`` did not reach are
        asked by id (``MAX_ASKED_ONE_BY_ONE`` a call; a user left out of the
        answer is not reported, and is asked by a later call).
        """
        wanted = {user_id for user_id in user_ids if is_uuid(user_id)}
        found: dict[str, Identity | None] = {user_id: None for user_id in user_ids if user_id not in wanted}
        if not wanted:
            return found
        self.stats["upstream"] += 1
        began = self._read_begins()
        users: dict = {}
        complete = False
        try:
            for page in range(1, MAX_LIST_PAGES + 1):
                with self._deadline():
                    batch = self._admin.auth.admin.list_users(page=page, per_page=LIST_PAGE)
                users.update((user.id, user) for user in batch if user.id in wanted)
                if len(batch) < LIST_PAGE:
                    complete = True
                    break
                if len(users) == len(wanted):
                    break
            asked = {} if complete else self._ask_one_by_one(wanted - users.keys())
            users.update((user_id, user) for user_id, (user, _) in asked.items())
            ids = [user_id for user_id, user in users.items() if user is not None]
            profiles: dict[str, dict] = {}
            for start in range(0, len(ids), PROFILE_BATCH):
                with self._deadline():
                    rows = (
                        self._admin.table(self.profiles_table)
                        .select(f"{self.id_column},{self.role_column},{self.clinic_column}")
                        .in_(self.id_column, ids[start : start + PROFILE_BATCH])
                        .execute()
                        .data
                    )
                profiles.update((str(row.get(self.id_column)), row) for row in rows if isinstance(row, dict))
        except DirectoryUnavailable as down:
            raise self._unavailable(down) from None
        except (AuthError, APIError, httpx.HTTPError, OSError, ValueError) as problem:
            raise self._unavailable(problem) from None
        self._up()
        for user_id in wanted:
            if user_id in users:
                found[user_id] = self._identity(users[user_id], profiles.get(user_id, {}))
            elif complete:
                found[user_id] = None
            else:
                continue  # not proven gone: the list was cut short
            read = asked[user_id][1] if user_id in asked else began  # a user asked by id: that read's number
            found[user_id] = self._remember(user_id, found[user_id], read)
        return found

    def _ask_one_by_one(self, missing: set[str]) -> dict[str, tuple[User | None, int]]:
        """Auth users by id (None: not found), each with its read's number (see _remember), the least
        recently refreshed first, up to MAX_ASKED_ONE_BY_ONE.

        One that cannot be read (a 5xx for that row, a timeout) is left out, and asked again next time;
        the round stops at the third such failure (Supabase itself is in trouble). What was read is
        kept either way: one failure must not throw away a re-check of thousands.
        """

        def refreshed(user_id: str) -> float:
            cached = self._cache.get(user_id)
            return cached[0] if cached else 0.0

        asked: dict[str, tuple[User | None, int]] = {}
        failures = 0
        for user_id in sorted(missing, key=refreshed)[:MAX_ASKED_ONE_BY_ONE]:
            began = self._read_begins()
            try:
                with self._deadline():
                    asked[user_id] = (self._admin.auth.admin.get_user_by_id(user_id).user, began)
                continue
            except AuthApiError as refused:
                if refused.status == 404:
                    asked[user_id] = (None, began)
                    continue
                why = str(refused)
            except (DirectoryUnavailable, AuthError, httpx.HTTPError, OSError, ValueError) as problem:
                why = str(problem)
            failures += 1
            event("identity.lookup_failed", level="warning", source=self.name, userId=user_id, error=why[:200])
            if failures >= 3:
                break
        return asked

    def changes_since(self, cursor: int | None) -> tuple[int, list[str]]:
        """Changes happen in Supabase, not here: the periodic re-check (get_many) finds them."""
        return 0, []

    def _identity(self, user: User | None, profile: dict) -> Identity | None:
        if user is None or getattr(user, "deleted_at", None):
            return None
        meta = user.app_metadata or {}
        names = user.user_metadata or {}
        role = str(profile.get(self.role_column) or meta.get("role") or DEFAULT_ROLE)
        return Identity(
            user_id=user.id,
            email=user.email,
            display_name=names.get("full_name") or names.get("name") or user.email,
            role=role,
            clinic_id=_text(profile.get(self.clinic_column)) or _text(meta.get("clinic_id")),
            # Anonymous sign-ins (a public front end's visitors, if the project allows them) are nobody's
            # staff: never a user of this service, whatever their metadata says. Nor, with
            # SUPABASE_ALLOWED_ROLES, a user of another role (a project that must allow sign-ups).
            active=not _banned(user.banned_until)
            and not getattr(user, "is_anonymous", False)
            and (self.allowed_roles is None or role in self.allowed_roles),
        )

    def _late(self) -> DirectoryUnavailable:
        return DirectoryUnavailable(f"Supabase did not answer within {self.timeout} s")

    def _deadline(self) -> gevent.Timeout:
        """A hard bound on one call, on top of httpx's per-read timeouts (a slow drip passes those)."""
        return gevent.Timeout(self.timeout, self._late())

    def _read_begins(self) -> int:
        self._reads += 1
        return self._reads

    def _remember(self, user_id: str, identity: Identity | None, began: int) -> Identity | None:
        """Cache what read number ``began`` found, unless a read begun after it has answered already
        (reads wait, and overlap: a slow lookup that saw the user before a ban must not overwrite the
        re-check that saw the ban). Returns the identity kept, the fresher of the two."""
        cached = self._cache.get(user_id)
        if cached is not None and cached[2] > began:
            return cached[1]
        self._cache[user_id] = (time.monotonic() + self.cache_ttl, identity, began)
        self._cache.move_to_end(user_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return identity

    def _unavailable(self, problem: Exception) -> DirectoryUnavailable:
        self.stats["errors"] += 1
        status = getattr(problem, "status", None) or getattr(problem, "code", None)
        prefix = f"HTTP {status} " if isinstance(status, (int, str)) and str(status).isdigit() else ""
        self.last_error = f"{type(problem).__name__}: {prefix}{problem}"[:300]
        self.last_error_at = time.time()
        if not self._failing:
            event("identity.unavailable", level="error", source=self.name, error=self.last_error)
        self._failing = True
        return problem if isinstance(problem, DirectoryUnavailable) else DirectoryUnavailable(self.last_error)

    def _up(self) -> None:
        if self._failing:
            event("identity.recovered", source=self.name)
        self._failing = False


def _text(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


def _banned(until: str | dt.datetime | None) -> bool:
    if not until:
        return False
    if isinstance(until, str):
        try:
            until = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
        except ValueError:
            return True  # unreadable: fail closed
    if until.tzinfo is None:
        until = until.replace(tzinfo=dt.UTC)
    return until > dt.datetime.now(dt.UTC)


def _issued_ms(claims: dict) -> int | None:
    """A JWT's ``iat`` (epoch seconds) in epoch ms; None when it has none that is a number."""
    issued = claims.get("iat")
    if isinstance(issued, bool) or not isinstance(issued, (int, float)):
        return None
    return int(issued * 1000)


def _refused(problem: BaseException) -> int | None:
    """The status when Supabase (or a gateway in front of it) refused the request itself, with a 4xx
    other than 408 and 429 (a wrong password, a bad token): the caller's fault, not an outage. Anyone
    can send either, and an outage turns /health degraded and logs an error. None otherwise."""
    status = _http_status(problem)
    return status if status is not None and 400 <= status < 500 and status not in (408, 429) else None


def _http_status(problem: BaseException) -> int | None:
    """The HTTP status behind a supabase-py error: its own, or that of the response it failed to read
    (a gateway's page that is not JSON makes supabase-py raise the JSON error)."""
    seen: BaseException | None = problem
    for _ in range(5):  # bounded: a chain of causes is short
        if seen is None:
            return None
        if isinstance(seen, AuthApiError) and seen.status:
            return seen.status
        if isinstance(seen, httpx.HTTPStatusError):
            return seen.response.status_code
        seen = seen.__cause__ or seen.__context__
    return None

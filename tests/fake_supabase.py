"""A local HTTP server that plays the few Supabase endpoints this service uses.

Supabase cannot run here (its stack needs Docker), so the tests run the real
``supabase`` client against this stand-in. It mirrors Supabase's paths,
headers and response shapes:

| call                                   | HTTP                                              |
|----------------------------------------|---------------------------------------------------|
| ``auth.admin.get_user_by_id(uid)``     | ``GET /auth/v1/admin/users/{uid}``                |
| ``table(t).select(..).eq("id", uid)``  | ``GET /rest/v1/{t}?select=..&id=eq.{uid}``        |
| ``table(t).select(..).in_("id", ids)`` | ``GET /rest/v1/{t}?select=..&id=in.(a,b,..)``     |
| ``auth.admin.list_users(page, n)``     | ``GET /auth/v1/admin/users?page=..&per_page=..``  |
| ``auth.get_user(jwt)``                 | ``GET /auth/v1/user`` (``Authorization: Bearer``) |
| (the project's auth settings, httpx)   | ``GET /auth/v1/settings`` (``apikey``)            |
| ``auth.sign_in_with_password(..)``     | ``POST /auth/v1/token?grant_type=password``       |
| ``table(log).upsert(rows, ..)``        | ``POST /rest/v1/{log}?on_conflict=id&columns=..`` |
| ``table(log).select("*").eq/contains/gte/lte/order/range`` | ``GET /rest/v1/{log}?type=eq.X&channels=cs.{c}&..`` |
| ``table(log).delete(count=exact).lt("at", t)`` | ``DELETE /rest/v1/{log}?at=lt.T``          |

and it checks what real Supabase checks: the ``apikey`` header, the
``Authorization: Bearer <service role key>`` on admin and PostgREST calls,
and HS256 access tokens signed with the project's JWT secret. Every request is
recorded so tests can assert on exactly what the client sent. ``mode`` makes
it fail: ``"error"`` answers 500, ``"hang"`` holds the request for
``hang_seconds`` (a Supabase that accepts and never answers).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt

SERVICE_KEY = "fake-service-role-key-" + "s" * 24
ANON_KEY = "fake-anon-key-" + "a" * 24
JWT_SECRET = "fake-project-jwt-secret-" + "j" * 24


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict


@dataclass
class FakeUser:
    id: str
    email: str
    password: str = "pw-correct-horse"
    app_metadata: dict = field(default_factory=dict)
    user_metadata: dict = field(default_factory=dict)
    banned_until: str | None = None
    is_anonymous: bool = False  # signed in anonymously (Supabase's anonymous sign-ins)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": self.email,
            "app_metadata": {"provider": "email", "providers": ["email"], **self.app_metadata},
            "user_metadata": self.user_metadata,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "banned_until": self.banned_until,
            "identities": [],
            "is_anonymous": self.is_anonymous,
        }


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog of 5 refuses a burst of lookups


class FakeSupabase:
    def __init__(self) -> None:
        self.users: dict[str, FakeUser] = {}
        self.profiles: dict[str, dict] = {}  # user id -> row (column names as stored)
        self.profiles_table = "profiles"  # the table name PostgREST serves them under
        self.log_table = "broadcast_log"  # rows of the broadcast log, by id, as PostgREST would keep them
        self.log_rows: dict[str, dict] = {}
        self.requests: list[Recorded] = []
        self.at_once: dict[str, int] = {}  # path -> requests being answered now
        self.most_at_once: dict[str, int] = {}  # path -> the most answered at once so far
        self.mode = "ok"
        self.hang_seconds = 10.0
        self.delay = 0.0  # answer correctly, but this much later (to make lookups overlap)
        # The gateway in front of a project refuses a header this long with a page of its own, not JSON.
        self.gateway_header_limit = 16 * 1024
        self.max_rows = 1000  # PostgREST's max-rows, as Supabase sets it: longer answers are cut, silently
        self.user_status: int | None = None  # set: GET /auth/v1/user answers this status, whatever the token
        self.disable_signup = False  # the project's auth settings (GET /auth/v1/settings), as a new project's
        # users whose lookup by id answers 500 (GoTrue does, for a row inserted by SQL with NULL token columns)
        self.broken_users: set[str] = set()
        self.gateway_status: int | None = None  # set: the gateway answers every request so, with a page of its own
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeSupabase:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- test helpers ----------------------------------------------------------------

    def add_user(self, email: str, *, user_id: str | None = None, profile: dict | None = None, **kwargs) -> FakeUser:
        user = FakeUser(id=user_id or str(uuid.uuid4()), email=email, **kwargs)
        self.users[user.id] = user
        if profile is not None:
            self.profiles[user.id] = {"id": user.id, **profile}
        return user

    def access_token(
        self,
        user: FakeUser,
        *,
        expires_in: int = 3600,
        secret: str = JWT_SECRET,
        audience: str = "authenticated",
        issued_at: int | None | str = "now",
    ) -> str:
        """A signed access token as Supabase issues it; ``issued_at`` its ``iat`` (None: no ``iat``)."""
        now = int(time.time())
        claims: dict = {"sub": user.id, "aud": audience, "role": "authenticated", "email": user.email}
        if issued_at is not None:
            claims["iat"] = now if issued_at == "now" else issued_at
        claims["exp"] = now + expires_in
        return jwt.encode(claims, secret, algorithm="HS256")

    def site_env(self) -> dict:
        """The environment that makes the service use this stand-in as its Supabase project."""
        return {"SUPABASE_URL": self.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY, "SUPABASE_ANON_KEY": ANON_KEY}

    def calls(self, prefix: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def reset_calls(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- the server ------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.requests.append(
                        Recorded(
                            method, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}
                        )
                    )
                    now = fake.at_once[parts.path] = fake.at_once.get(parts.path, 0) + 1
                    fake.most_at_once[parts.path] = max(now, fake.most_at_once.get(parts.path, 0))
                try:
                    self._answer(method, parts, body)
                finally:
                    with fake.lock:
                        fake.at_once[parts.path] -= 1

            def _answer(self, method: str, parts, body: bytes) -> None:
                if fake.mode == "hang":
                    time.sleep(fake.hang_seconds)
                elif fake.delay:
                    time.sleep(fake.delay)
                if fake.mode in ("error", "hang"):
                    return self._reply(500, {"code": 500, "msg": "Internal Server Error"})
                if any(len(value) > fake.gateway_header_limit for value in self.headers.values()):
                    return self._gateway_page(400, "Request Header Or Cookie Too Large")
                if fake.gateway_status is not None:
                    return self._gateway_page(fake.gateway_status, "from the gateway")
                if not self.headers.get("apikey"):
                    return self._reply(401, {"message": "No API key found in request"})
                if self.headers.get("apikey") not in (SERVICE_KEY, ANON_KEY):
                    return self._reply(401, {"message": "Invalid API key", "hint": "Double check your Supabase key."})
                headers = {}
                try:
                    if parts.path == f"/rest/v1/{fake.log_table}":
                        status, payload, headers = fake._log_route(
                            method, parse_qs(parts.query), self.headers.get("Authorization", ""), body
                        )
                    else:
                        status, payload = fake._route(
                            method, parts.path, parse_qs(parts.query), self.headers.get("Authorization", ""), body
                        )
                except Exception as error:  # a bug in the fake must show up, not hang the client
                    status, payload = 500, {"msg": f"fake error: {error}"}
                self._reply(status, payload, headers)

            def _gateway_page(self, status: int, title: str) -> None:
                page = f"<html><body><h1>{status} {title}</h1></body></html>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def _reply(self, status: int, payload, headers: dict | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _route(self, method: str, path: str, query: dict, authorization: str, body: bytes):
        bearer = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        if method == "GET" and path == "/auth/v1/settings":  # public: the apikey header only
            return 200, {"disable_signup": self.disable_signup, "external": {"email": True, "anonymous_users": False}}
        if method == "GET" and path == "/auth/v1/admin/users":
            if bearer != SERVICE_KEY:
                return 403, {"code": 403, "error_code": "not_admin", "msg": "User not allowed"}
            page, per_page = int(query.get("page", ["1"])[0]), int(query.get("per_page", ["50"])[0])
            users = list(self.users.values())[(page - 1) * per_page : page * per_page]
            return 200, {"users": [user.to_json() for user in users], "aud": "authenticated"}
        if method == "GET" and path.startswith("/auth/v1/admin/users/"):
            if bearer != SERVICE_KEY:
                return 403, {"code": 403, "error_code": "not_admin", "msg": "User not allowed"}
            if path.rsplit("/", 1)[1] in self.broken_users:
                return 500, {"code": 500, "error_code": "unexpected_failure", "msg": "Database error finding user"}
            user = self.users.get(path.rsplit("/", 1)[1])
            if user is None:
                return 404, {"code": 404, "error_code": "user_not_found", "msg": "User not found"}
            return 200, user.to_json()
        if method == "GET" and path.startswith("/rest/v1/"):
            if bearer != SERVICE_KEY:
                return 401, {"code": "PGRST301", "message": "JWSError"}
            table = path[len("/rest/v1/") :]
            rows = list(self.profiles.values()) if table == self.profiles_table else None
            if rows is None:
                return 404, {"code": "PGRST205", "message": f"Could not find the table 'public.{table}'"}
            for key, values in query.items():
                if key in ("select", "limit"):
                    continue
                op, _, wanted = values[0].partition(".")
                if op == "in":
                    chosen = set(wanted.strip("()").split(","))
                    rows = [row for row in rows if str(row.get(key)) in chosen]
                else:
                    rows = [row for row in rows if op == "eq" and str(row.get(key)) == wanted]
            if "select" in query:
                columns = query["select"][0].split(",")
                rows = [{c: row.get(c) for c in columns} for row in rows]
            if "limit" in query:
                rows = rows[: int(query["limit"][0])]
            return 200, rows
        if method == "GET" and path == "/auth/v1/user":
            if self.user_status is not None:
                return self.user_status, {"code": self.user_status, "msg": "as the test said"}
            try:
                claims = jwt.decode(bearer, JWT_SECRET, algorithms=["HS256"], audience="authenticated")
            except jwt.ExpiredSignatureError:
                return 403, {"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT: token is expired"}
            except jwt.InvalidTokenError:
                return 403, {"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT: signature is invalid"}
            user = self.users.get(claims.get("sub"))
            if user is None:
                return 404, {"code": 404, "error_code": "user_not_found", "msg": "User not found"}
            return 200, user.to_json()
        if method == "POST" and path == "/auth/v1/token" and query.get("grant_type") == ["password"]:
            doc = json.loads(body or b"{}")
            user = next((u for u in self.users.values() if u.email == doc.get("email")), None)
            if user is None or user.password != doc.get("password"):
                return 400, {"code": 400, "error_code": "invalid_credentials", "msg": "Invalid login credentials"}
            return 200, {
                "access_token": self.access_token(user),
                "token_type": "bearer",
                "expires_in": 3600,
                "expires_at": int(time.time()) + 3600,
                "refresh_token": "fake-refresh",
                "user": user.to_json(),
            }
        return 404, {"msg": f"no fake for {method} {path}"}

    # -- the broadcast log table (PostgREST's filters, as the client sends them) -----------

    def _log_route(self, method: str, query: dict, authorization: str, body: bytes):
        if authorization != f"Bearer {SERVICE_KEY}":
            return 401, {"code": "PGRST301", "message": "JWSError"}, {}
        if method == "POST":
            if query.get("on_conflict") != ["id"]:
                return 409, {"code": "23505", "message": "duplicate key value violates unique constraint"}, {}
            rows = json.loads(body)
            with self.lock:
                for row in rows if isinstance(rows, list) else [rows]:
                    row = {**row, "at": _pg_time(row["at"])}  # timestamptz comes back as +00:00
                    self.log_rows.setdefault(row["id"], row)  # resolution=ignore-duplicates
            return 201, None, {}
        with self.lock:
            rows = [row for row in self.log_rows.values() if _matches(row, query)]
        if method == "DELETE":
            with self.lock:
                for row in rows:
                    del self.log_rows[row["id"]]
            return 204, None, {"Content-Range": f"*/{len(rows)}"}
        for order in reversed(query.get("order", [""])[0].split(",")):
            column, _, direction = order.partition(".")
            if column:
                rows.sort(key=lambda row, c=column: _sortable(row.get(c)), reverse=direction.startswith("desc"))
        start = int(query.get("offset", ["0"])[0])
        rows = rows[start : start + min(self.max_rows, int(query.get("limit", [str(self.max_rows)])[0]))]
        return 200, rows, {}


def _pg_time(text: str) -> str:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat()


def _sortable(value):
    if isinstance(value, str) and value[:4].isdigit() and "T" in value:
        return dt.datetime.fromisoformat(value).timestamp()
    return value


def _matches(row: dict, query: dict) -> bool:
    for key, values in query.items():
        if key in ("select", "order", "offset", "limit", "columns", "on_conflict"):
            continue
        for value in values:
            op, _, wanted = value.partition(".")
            have = row.get(key)
            if op == "eq" and str(have) != wanted:
                return False
            if op == "cs" and not set(wanted.strip("{}").split(",")) <= set(have or []):
                return False
            if op in ("gte", "lte", "lt"):
                left, right = _sortable(have), _sortable(_pg_time(wanted))
                if not {"gte": left >= right, "lte": left <= right, "lt": left < right}[op]:
                    return False
    return True

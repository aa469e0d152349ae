"""Every close code and error code the service emits, in one place.

Clients branch on these numbers and strings, so they are part of the wire
contract: add new ones, never renumber or rename. Each line says what a
client should do when it sees the code.
"""

from enum import IntEnum


class Close(IntEnum):
    """WebSocket close codes sent by the server.

    1000-1015 are RFC 6455 codes; 4xxx are this service's own, numbered after
    the HTTP status a browser would have seen if it could read one.
    """

    NORMAL = 1000  # the server is done with this socket; reconnect only if you still need it
    PROTOCOL_ERROR = 1002  # the client broke RFC 6455 framing; fix the client, do not retry unchanged
    INVALID_PAYLOAD = 1007  # a text frame was not UTF-8; fix the client
    POLICY_VIOLATION = 1008  # too many messages too fast; back off before reconnecting
    MESSAGE_TOO_BIG = 1009  # a frame or message over the size limit; do not resend it
    INTERNAL_ERROR = 1011  # a server bug; reconnect with backoff
    SERVICE_RESTART = 1012  # the worker is restarting (deploy); reconnect now, with a little jitter
    TRY_AGAIN_LATER = 1013  # overloaded, slow consumer, or identity source down; reconnect with backoff
    UNAUTHORIZED = 4401  # token missing, malformed, forged or expired; fetch a new token, then reconnect
    FORBIDDEN = 4403  # the user is unknown or disabled; do not reconnect
    KEEPALIVE_TIMEOUT = 4408  # no answer to the server's pings; reconnect with backoff
    REPLACED = 4409  # this socket's session was resumed on a newer socket; nothing to do if you did that
    TOO_MANY_CONNECTIONS = 4429  # this user has WS_MAX_CONNECTIONS_PER_USER sockets already; back off, retry later


class Error:
    """Codes carried in ``{"type": "ERROR", "data": {"code", "message"}}``.

    An ERROR frame never closes the socket by itself (except ``RATE_LIMITED``,
    which is followed by close 1008): the client may correct itself and go on.
    """

    INVALID_JSON = "invalid_json"  # the frame is not JSON
    INVALID_MESSAGE = "invalid_message"  # JSON, but not an object with a string "type"
    UNKNOWN_TYPE = "unknown_type"  # "type" is not PING, SUBSCRIBE or UNSUBSCRIBE
    INVALID_DATA = "invalid_data"  # "data" has the wrong shape (e.g. channels not a list of strings)
    BINARY_NOT_SUPPORTED = "binary_not_supported"  # the protocol is JSON text frames only
    UNKNOWN_CHANNEL = "unknown_channel"  # the name matches no channel pattern
    FORBIDDEN_CHANNEL = "forbidden_channel"  # a real channel this user may not read
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"  # the per-connection subscription limit
    RATE_LIMITED = "rate_limited"  # sent just before close 1008


class HttpError:
    """Codes carried in ``{"ok": false, "error": {"code", "message"}}`` answers."""

    UNAUTHORIZED = "unauthorized"  # no or wrong credentials (401)
    FORBIDDEN = "forbidden"  # authenticated, but not allowed (403)
    CSRF_FAILED = "csrf_failed"  # cookie session without a matching CSRF token (403)
    NOT_FOUND = "not_found"  # no such endpoint (404)
    UNKNOWN_USER = "unknown_user"  # a user id the identity source does not know (404)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # (405)
    INVALID_JSON = "invalid_json"  # body is not JSON (400)
    INVALID_BODY = "invalid_body"  # JSON of the wrong shape (400)
    INVALID_QUERY = "invalid_query"  # a query parameter of the wrong form (400)
    BODY_TOO_LARGE = "body_too_large"  # body over its route's limit (400 on /broadcast, 413 elsewhere)
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"  # Idempotency-Key not 1-200 visible ASCII, no space (400)
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"  # the key was first used with another broadcast: new key (422)
    FOREIGN_ORIGIN = "foreign_origin"  # WebSocket from an origin not allowed (403)
    BAD_UPGRADE = "bad_upgrade"  # a WebSocket upgrade missing what RFC 6455 requires (400, or 426 for the version)
    REQUEST_TIMEOUT = "request_timeout"  # the request body did not arrive within HTTP_REQUEST_TIMEOUT_MS (408)
    TOO_MANY_ATTEMPTS = "too_many_attempts"  # too many refused credentials from this address: wait Retry-After (429)
    UNAVAILABLE = "unavailable"  # broker, identity source, sign-out store down, or a draining worker (503)
    INTERNAL = "internal_error"  # a server bug (500)

"""Sign-in throttling: a brute force is slowed to a crawl, a person who mistypes never notices.

Failed sign-ins are counted per account and per client address over a
sliding window (15 min). The first failures cost nothing (4 per account, 19
per address); the next one blocks further attempts for 30 s, and from then
on every failure blocks for twice as long as the one before (1 min, 2 min,
... up to 15 min). That back-off level is remembered for a day (``memory``),
not just for the window: an attacker who waits for the window to slide gets
no new free guesses, so one account takes at most about a hundred guesses a
day, from however many addresses. While blocked, every attempt is refused
with 429 and ``Retry-After``, **the right password included**: otherwise a
guesser would learn which guess was right. A success clears the account
(its failures, block and level), and takes its own attempt back from the
address. Accounts are independent: hammering one does not lock out another,
except through the address limit, which is higher (a clinic's users share
one address).

A browser that has signed in to the account before (it shows a device cookie
the server signed: :mod:`relay.devices`) is counted apart: its attempts count
against that browser, with the account's limit, and against its address among
known browsers only (99 free); neither the account's block nor the address's
applies to it. Without that, anyone who knows a person's email could keep
them out for good, one wrong password per block; with it the guesser is
still held to the account's pace, and the person signs in from their usual
browser.

Bearer access tokens sent to ``/api/ws/auth`` (a front end signed in with
Supabase) are a credential too, and each one Supabase checks is a call to it:
they are counted per client address apart from passwords, the same way
(:meth:`LoginThrottle.token_attempt`: counted before the check, taken back
when the token was good; 99 free a window, then the same doubling blocks),
and while an address is blocked its tokens are answered 429 without being
checked. Counted before, not after: a burst sent at once would otherwise all
be checked before the first refusal was counted.

An attempt is counted **before** the password is checked, atomically with
the check for a block (:meth:`LoginThrottle.attempt`): a hundred guesses sent
at the same instant are counted one by one, and all but the free ones are
refused, instead of all slipping through while the first is being checked.

Two stores behind one small interface: :class:`MemoryThrottleStore` (one
process) and :class:`RedisThrottleStore` (shared by every worker and host,
one Lua script per attempt). Keys are hashed: neither store holds an email
address or a client address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

from .redis_store import RedisStore


class ThrottleUnavailable(Exception):
    """The throttle's store cannot answer (Redis down): sign-in fails closed, with a 503."""


@dataclass(frozen=True)
class Limit:
    free: int  # the failure within the window that first earns a block (earlier ones cost nothing)
    first_wait: float = 30.0  # seconds, for that first block; each next one doubles
    max_wait: float = 900.0


@dataclass(frozen=True)
class Attempt:
    """What :meth:`LoginThrottle.attempt` decided: ``wait`` > 0 means refused (nothing was counted);
    otherwise ``id`` names the attempt, counted as a failure under ``keys`` (the account's or the
    browser's first) until :meth:`LoginThrottle.succeeded` takes it back, and ``earned`` is the block it
    will have cost if the password is wrong."""

    wait: float
    id: str | None = None
    earned: float = 0.0
    keys: tuple[str, ...] = ()


class ThrottleStore(Protocol):
    def attempt(self, keys: list[tuple[str, Limit]], now: float, window: float, memory: float) -> Attempt:
        """Atomically: if any key is blocked at ``now``, ``Attempt(wait)`` and nothing changes. Otherwise
        count a failure (a new id) under every key; each key whose failures within ``window`` reach its
        ``free``, or whose back-off level is above 0, goes up a level (remembered ``memory`` seconds) and
        is blocked for ``min(max_wait, first_wait * 2 ** (level - 1))``."""

    def blocked_until(self, key: str) -> float:
        """When ``key`` may try again (0 if it may now)."""

    def withdraw(self, keys: list[str], attempt_id: str, *, reset_first: bool) -> None:
        """Take this attempt back from ``keys`` (its failure, and a block and level it caused); with
        ``reset_first`` (a right password) forget the first key, the account, entirely."""


class LoginThrottle:
    def __init__(
        self,
        store: ThrottleStore,
        *,
        window: float = 900.0,
        memory: float = 86_400.0,
        account: Limit = Limit(free=5),
        address: Limit = Limit(free=20),
        known_address: Limit = Limit(free=100),
        token_address: Limit = Limit(free=100),
    ):
        self.store = store
        self.window = window
        self.memory = memory
        self.account = account
        self.address = address
        # Known browsers' failures per address, apart from the others': a guesser among a clinic's users
        # cannot block them, and one who signs in to their own account again and again, for a new device
        # id each time, cannot fill the store with keys.
        self.known_address = known_address
        self.token_address = token_address

    def attempt(
        self, login: str, address: str | None, now: float | None = None, *, device: str | None = None
    ) -> Attempt:
        """Before checking a password: refused (``wait`` > 0), or counted as a failure until it succeeds.

        ``device`` is the id a valid device cookie of this account carries (:mod:`relay.devices`):
        the attempt is then counted against that browser alone, with the account's limit.
        """
        return self._counted(self._limits(login, address, device), now)

    def succeeded(self, attempt: Attempt) -> None:
        """The right password: the account (or the browser) starts afresh; the address forgets this
        attempt only."""
        if attempt.id is not None:
            self.store.withdraw(list(attempt.keys), attempt.id, reset_first=True)

    def withdraw(self, attempt: Attempt) -> None:
        """The password could not be checked (the identity source is down): the attempt does not count."""
        if attempt.id is not None:
            self.store.withdraw(list(attempt.keys), attempt.id, reset_first=False)

    def _limits(self, login: str, address: str | None, device: str | None) -> list[tuple[str, Limit]]:
        """The keys an attempt counts under, the one a success clears first."""
        if device is not None:  # a known browser (see the module's docstring)
            keys = [(_key("device", device), self.account)]
            if address:
                keys.append((_key("known-address", address), self.known_address))
        else:
            keys = [(account_key(login), self.account)]
            if address:
                keys.append((_key("address", address), self.address))
        return keys

    def wait(self, login: str, address: str | None, now: float | None = None, *, device: str | None = None) -> float:
        """Seconds before this account may try from this address, or from this browser (0: go ahead);
        counts nothing."""
        now = time.time() if now is None else now
        keys = [key for key, _ in self._limits(login, address, device)]
        return max(0.0, max(self.store.blocked_until(key) for key in keys) - now)

    def token_attempt(self, address: str | None, now: float | None = None) -> Attempt:
        """Before a bearer access token from this address is checked: refused (``wait`` > 0), or counted
        as refused until :meth:`withdraw` takes it back (the token was good, or could not be checked)."""
        if not address:
            return Attempt(0.0)
        return self._counted([(_key("token-address", address), self.token_address)], now)

    def _counted(self, keys: list[tuple[str, Limit]], now: float | None) -> Attempt:
        """Refused, or counted under ``keys`` (named in the attempt, for :meth:`withdraw`)."""
        now = time.time() if now is None else now
        decided = self.store.attempt(keys, now, self.window, self.memory)
        return replace(decided, keys=tuple(key for key, _ in keys)) if decided.id is not None else decided


def account_key(login: str) -> str:
    """The account's name in the stores (and in device cookies): a digest of its canonical spelling."""
    return _key("account", login)


def _key(kind: str, value: str) -> str:
    if kind == "account":
        canonical = _account(value)
    elif kind in ("address", "known-address", "token-address"):
        canonical = _address(value)
    else:  # a device id: random, one spelling
        canonical = value
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


def _account(login: str) -> str:
    """One key for every spelling an identity source may take for the same name: case folded, accents
    and other marks dropped, compatibility forms unified ("İnfo", "info" and "ｉｎｆｏ" are one
    account to Supabase, whose lookup lower-cases with Go's simple mapping). A coarser key only makes
    the limit stricter, never looser."""
    decomposed = unicodedata.normalize("NFKD", login.strip())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _address(address: str) -> str:
    """An IPv6 client has a /64 to itself (one per address would be 2**64 buckets); an IPv4-mapped
    one is its IPv4 address."""
    text = address.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443", as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:5678"
        text = text.split(":")[0]
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return address.strip().lower()
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _backoff(limit: Limit, level: int) -> float:
    return min(limit.max_wait, limit.first_wait * 2.0 ** min(level - 1, 60))


@dataclass
class _State:
    failures: list[tuple[float, str]] = field(default_factory=list)
    level: int = 0
    level_until: float = 0.0
    blocked_until: float = 0.0
    blocked_by: str | None = None


EVICTION_SCAN = 64  # keys looked at, oldest first, for one that holds nothing back (see _evict_one)


class MemoryThrottleStore:
    """Per process (one worker). Bounded: the least recently seen keys go first past ``max_keys``."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()

    def attempt(self, keys: list[tuple[str, Limit]], now: float, window: float, memory: float) -> Attempt:
        with self._lock:
            # Looked up, not created, until the attempt is counted: refused attempts (a blocked address
            # trying new names) must not fill the store, nor push out the entries that block someone.
            wait = max(self._blocked_until_held(key) for key, _ in keys) - now
            if wait > 0:
                return Attempt(wait)
            states = [(self._state(key, now), limit) for key, limit in keys]
            attempt_id = secrets.token_hex(8)
            earned = 0.0
            for state, limit in states:
                state.failures = [(t, i) for t, i in state.failures if t > now - window][-999:]
                state.failures.append((now, attempt_id))
                if state.level_until <= now:
                    state.level = 0
                if len(state.failures) >= limit.free or state.level > 0:
                    state.level += 1
                    state.level_until = now + memory
                    block = _backoff(limit, state.level)
                    state.blocked_until, state.blocked_by = now + block, attempt_id
                    earned = max(earned, block)
            return Attempt(0.0, attempt_id, earned)

    def blocked_until(self, key: str) -> float:
        with self._lock:
            return self._blocked_until_held(key)

    def _blocked_until_held(self, key: str) -> float:
        """:meth:`blocked_until`, for a caller that holds the lock."""
        state = self._states.get(key)
        return state.blocked_until if state else 0.0

    def withdraw(self, keys: list[str], attempt_id: str, *, reset_first: bool) -> None:
        with self._lock:
            if reset_first:
                self._states.pop(keys[0], None)
                keys = keys[1:]
            for key in keys:
                state = self._states.get(key)
                if state is None:
                    continue
                state.failures = [(t, i) for t, i in state.failures if i != attempt_id]
                if state.blocked_by == attempt_id:
                    state.blocked_until, state.blocked_by = 0.0, None
                    state.level = max(0, state.level - 1)

    def _state(self, key: str, now: float) -> _State:
        state = self._states.pop(key, None)
        if state is None:
            state = _State()
            if len(self._states) >= self.max_keys:
                self._evict_one(now)
        self._states[key] = state  # most recently seen last
        return state

    def _evict_one(self, now: float) -> None:
        """Make room: the least recently seen key that blocks no one and carries no back-off level, among
        the oldest few (bounded work); failing that, the least recently seen. Evicting a level gives its
        account the free guesses back, so an attacker who floods the store with new keys must not be
        able to push out the one under attack: the keys with a level looked at on the way go to the back
        (a second chance); without that, 65 decoys given a level behind it kept it the oldest of every
        scan. Pushing it out now takes 65 keys with a level lined up just ahead of it in the order."""
        spared: list[str] = []
        free = None
        for key, state in self._states.items():
            if state.blocked_until <= now and state.level_until <= now:
                free = key
                break
            spared.append(key)
            if len(spared) > EVICTION_SCAN:
                break
        for key in spared:
            self._states.move_to_end(key)
        if free is not None:
            del self._states[free]
        else:  # every key looked at holds a level: the oldest after them
            self._states.popitem(last=False)


# KEYS: one failures set per key (its :lvl, :block, :by beside it)
# ARGV: now, window s, memory ms, attempt id, then free, first wait, max wait for each key
_ATTEMPT = """
local now, window, memory, id = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local wait = 0
for _, key in ipairs(KEYS) do
  local left = tonumber(redis.call('GET', key .. ':block') or '0') - now
  if left > wait then wait = left end
end
if wait > 0 then return {tostring(wait), '0'} end
local earned = 0
for i, key in ipairs(KEYS) do
  local free, first, max = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  redis.call('ZADD', key, now, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
  local level = tonumber(redis.call('GET', key .. ':lvl') or '0')
  if redis.call('ZCARD', key) >= free or level > 0 then
    level = level + 1
    redis.call('SET', key .. ':lvl', level, 'PX', memory)
    local block = math.min(max, first * 2 ^ math.min(level - 1, 60))
    local ends = math.ceil((now + block) * 1000) + 1
    redis.call('SET', key .. ':block', tostring(now + block), 'PXAT', ends)
    redis.call('SET', key .. ':by', id, 'PXAT', ends)
    if block > earned then earned = block end
  end
end
return {'0', tostring(earned)}
"""

# KEYS: the keys (the account first)   ARGV: attempt id, '1' to forget the first key entirely
_WITHDRAW = """
local from = 1
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[1] .. ':lvl', KEYS[1] .. ':block', KEYS[1] .. ':by')
  from = 2
end
for i = from, #KEYS do
  local key = KEYS[i]
  redis.call('ZREM', key, ARGV[1])
  if redis.call('GET', key .. ':by') == ARGV[1] then
    redis.call('DEL', key .. ':block', key .. ':by')
    if tonumber(redis.call('GET', key .. ':lvl') or '0') > 0 then redis.call('DECR', key .. ':lvl') end
  end
end
return 1
"""


class RedisThrottleStore(RedisStore):
    """Shared by every worker and host: per key a sorted set of failures, its level and its block."""

    unavailable = ThrottleUnavailable

    def __init__(self, url: str, *, prefix: str):
        self.prefix = f"{prefix}:login:"
        super().__init__(url)
        self._attempt = self._client.register_script(_ATTEMPT)
        self._withdraw = self._client.register_script(_WITHDRAW)

    def attempt(self, keys: list[tuple[str, Limit]], now: float, window: float, memory: float) -> Attempt:
        attempt_id = secrets.token_hex(8)
        args: list[object] = [repr(now), repr(window), int(memory * 1000), attempt_id]
        for _, limit in keys:
            args += [limit.free, repr(limit.first_wait), repr(limit.max_wait)]
        wait, earned = self._call(self._attempt, keys=[self.prefix + key for key, _ in keys], args=args)
        if float(wait) > 0:
            return Attempt(float(wait))
        return Attempt(0.0, attempt_id, float(earned))

    def blocked_until(self, key: str) -> float:
        raw = self._call(self._client.get, self.prefix + key + ":block")
        return float(raw) if raw else 0.0

    def withdraw(self, keys: list[str], attempt_id: str, *, reset_first: bool) -> None:
        args = [attempt_id, "1" if reset_first else "0"]
        self._call(self._withdraw, keys=[self.prefix + key for key in keys], args=args)

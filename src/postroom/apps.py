"""App credentials and limits: what an application uses to hand mail in, and what it may do.

Secrets are shown once at creation (or rotation) and stored as a keyed hash: HMAC-SHA256
under a key derived from the instance key. An app secret is a 192-bit random token, so a
slow password hash (argon2) adds nothing against guessing and makes every AUTH attempt,
good or bad, cost 64 MiB and ~0.1 s of CPU: an unauthenticated client could spend the
server's memory and threads at will. argon2 stays for what humans choose (admin passwords).
Rows from before that change still hold an argon2 hash; the first successful check re-stores
them as HMAC, and until then they are checked one at a time on a thread of their own.

Limits (all optional): the sender addresses or domains an app may use (envelope sender and
From), the connections it may pin and see, and a rate (messages per period, per process).
They are enforced at intake (``ingress.accept``), the one path every door takes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from postroom.exceptions import MessageError
from postroom.secrets import subkey
from postroom.settings import parse_rate
from postroom.store.db import write_transaction
from postroom.store.schema import apps

NAME_RULE = "1-64 characters: letters, digits, '.', '_', '-', '@'"
# Names the doors and tools write into a message's ``source`` ("smtp:trusted",
# "python:embedded", "sendmail:root", "cli:test"...). An app may not take one: the log must
# never show an app's name where it means "no app", and the reverse.
RESERVED = frozenset({
    "admin", "api", "cli", "embedded", "http", "postroom", "python", "resend", "root",
    "sendmail", "smtp", "system", "test", "trusted", "wizard",
})
_HMAC_PREFIX = "hmac-sha256$"
# How long a looked-up app is trusted before the database is asked again: `postroom app
# remove` / `rotate` run in another process, so this bounds how long a removed or rotated
# app's open sessions and keys keep working.
POLICY_TTL = 1.0


def check_name(name: str) -> None:
    """Raise MessageError unless ``name`` is a valid, unreserved app name."""
    ok = (1 <= len(name) <= 64 and name.isascii()
          and all(c.isalnum() or c in "._-@" for c in name))
    if not ok:
        raise MessageError(f"invalid app name {name!r}: {NAME_RULE}", code="app.name")
    if name.lower() in RESERVED:
        raise MessageError(
            f"the app name {name!r} is reserved (Postroom uses it for mail that no app handed "
            f"in); pick another, e.g. {name}-app", code="app.reserved")


def check_sender_rule(rule: str) -> str:
    """An allowed-sender entry: an address (shop@example.com) or a domain (example.com, or
    @example.com); returned lower-case."""
    value = rule.strip().lower()
    local, at, domain = value.rpartition("@")
    if (not domain or "." not in domain.strip(".") or any(c in value for c in " <>,;\r\n\t")
            or (at and not local and value != f"@{domain}")):
        raise MessageError(
            f"{rule!r} is not a sender rule: give an address (shop@example.com) or a domain "
            "(example.com)", code="app.sender_rule")
    return value.removeprefix("@")


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """One app as the doors see it: who it is and what it may do."""

    name: str
    credential: str  # the stored hash: a rotation changes it, so sessions can tell
    senders: tuple[str, ...] = ()  # allowed addresses / domains; () = any
    connections: tuple[str, ...] = ()  # connections it may pin and see; () = any
    rate: str | None = None  # "100/hour": at most that many messages per period

    def may_send_as(self, address: str) -> bool:
        if not self.senders:
            return True
        addr = address.lower()
        domain = addr.rpartition("@")[2]
        return any(addr == s if "@" in s else domain == s for s in self.senders)

    def may_use(self, connection: str) -> bool:
        return not self.connections or connection in self.connections


@dataclass
class _RateWindow:
    """A sliding-window counter: the previous fixed window's count, weighted by how much of
    it still overlaps the sliding window, plus the current one's (O(1) memory per app)."""

    count: int
    period: float
    start: float = 0.0
    current: int = 0
    previous: int = 0

    def take(self, now: float) -> float | None:
        """Count one message now; None if allowed, else seconds until one would be."""
        elapsed = now - self.start
        if elapsed >= self.period:
            self.previous = self.current if elapsed < 2 * self.period else 0
            self.start, self.current = now - (elapsed % self.period), 0
            elapsed = now - self.start
        weight = 1.0 - elapsed / self.period
        if self.previous * weight + self.current + 1 > self.count:
            return max(0.1, self.period - elapsed)
        self.current += 1
        return None


@dataclass
class RateLimiter:
    """Per-app message rates. Kept in the process that accepts the mail: with several
    `postroom serve` nodes, each allows the rate (documented in SECURITY.md)."""

    windows: dict[tuple[str, str], _RateWindow] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, app: AppPolicy, now: float | None = None) -> float | None:
        if app.rate is None:
            return None
        count, period = parse_rate(app.rate)
        with self.lock:
            win = self.windows.get((app.name, app.rate))
            if win is None:
                win = self.windows[(app.name, app.rate)] = _RateWindow(count, period)
            return win.take(time.monotonic() if now is None else now)


def _legacy_hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()


class Apps:
    def __init__(self, engine: Engine, key: bytes | Callable[[], bytes]) -> None:
        """``key``: the instance key (or a function that loads it on first use)."""
        self.engine = engine
        self._key_source = key
        self._key: bytes | None = None
        self._policies: dict[str, tuple[AppPolicy | None, float]] = {}
        self._lock = threading.Lock()
        self.rates = RateLimiter()
        self._touched: dict[str, float] = {}
        # Old argon2 rows: one check at a time, off the threads the store's commits use.
        self._legacy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="app-legacy-hash")

    # -- secrets ---------------------------------------------------------------------------
    def _mac_key(self) -> bytes:
        if self._key is None:
            base = self._key_source() if callable(self._key_source) else self._key_source
            self._key = subkey(base, b"postroom app secret v1")
        return self._key

    def _digest(self, name: str, secret: str) -> str:
        mac = hmac.new(self._mac_key(), f"{name}\0{secret}".encode(), hashlib.sha256)
        return _HMAC_PREFIX + mac.hexdigest()

    @staticmethod
    def _new_secret() -> str:
        # A letter first: a secret starting with "-" would be read as an option by the
        # command-line tools people paste it into (swaks, msmtp, curl).
        return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(24)

    @staticmethod
    def api_key(name: str, secret: str) -> str:
        """The HTTP API's Bearer token for an app: its name and secret in one string (the
        secret alphabet has no '.', so the last '.' separates them)."""
        return f"{name}.{secret}"

    # -- administration --------------------------------------------------------------------
    def add(self, name: str, *, senders: Sequence[str] = (), connections: Sequence[str] = (),
            rate: str | None = None) -> str:
        """Create an app; returns its secret (the only time it is visible)."""
        check_name(name)
        limits = self._limits(senders, connections, rate)
        secret = self._new_secret()
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(insert(apps).values(
                    name=name, secret_hash=self._digest(name, secret), created_at=time.time(),
                    **limits))
        except IntegrityError as err:
            raise MessageError(
                f"an app named {name!r} exists; remove it first or pick another name",
                code="app.exists",
            ) from err
        return secret

    def rotate(self, name: str) -> str:
        """A new secret for ``name``; the old one, and every session opened with it, stop
        working (within POLICY_TTL in other processes)."""
        secret = self._new_secret()
        with write_transaction(self.engine) as conn:
            n = conn.execute(update(apps).where(apps.c.name == name).values(
                secret_hash=self._digest(name, secret), rotated_at=time.time())).rowcount
        if not n:
            raise MessageError(f"no app named {name!r}", code="app.unknown")
        self._forget(name)
        return secret

    def set_limits(self, name: str, *, senders: Sequence[str] | None = None,
                   connections: Sequence[str] | None = None,
                   rate: str | None = None, clear_rate: bool = False) -> None:
        """Change an app's limits; None leaves one as it is, an empty list lifts it."""
        values: dict[str, Any] = {}
        limits = self._limits(senders or (), connections or (), rate)
        if senders is not None:
            values["allowed_senders"] = limits["allowed_senders"]
        if connections is not None:
            values["allowed_connections"] = limits["allowed_connections"]
        if rate is not None or clear_rate:
            values["rate_limit"] = None if clear_rate else limits["rate_limit"]
        if not values:
            return
        with write_transaction(self.engine) as conn:
            if not conn.execute(update(apps).where(apps.c.name == name).values(**values)).rowcount:
                raise MessageError(f"no app named {name!r}", code="app.unknown")
        self._forget(name)

    @staticmethod
    def _limits(senders: Iterable[str], connections: Iterable[str],
                rate: str | None) -> dict[str, Any]:
        rules = sorted({check_sender_rule(s) for s in senders})
        names = sorted(set(connections))
        if rate is not None:
            try:
                parse_rate(rate)
            except ValueError as err:
                raise MessageError(str(err), code="app.rate") from err
        return {"allowed_senders": rules or None, "allowed_connections": names or None,
                "rate_limit": rate}

    def remove(self, name: str) -> bool:
        with write_transaction(self.engine) as conn:
            gone = bool(conn.execute(delete(apps).where(apps.c.name == name)).rowcount)
        self._forget(name)
        return gone

    def list(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(apps.c.name, apps.c.created_at, apps.c.last_used_at, apps.c.rotated_at,
                       apps.c.allowed_senders, apps.c.allowed_connections, apps.c.rate_limit)
                .order_by(apps.c.name))
            return [dict(r._mapping) for r in rows]

    # -- the doors' questions --------------------------------------------------------------
    def _forget(self, name: str) -> None:
        with self._lock:
            self._policies.pop(name, None)

    def policy(self, name: str) -> AppPolicy | None:
        """The app named ``name`` as stored at most POLICY_TTL seconds ago (None: no such
        app). Doors call it per message, so it is cached rather than read every time."""
        now = time.monotonic()
        with self._lock:
            hit = self._policies.get(name)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.engine.connect() as conn:
            row = conn.execute(select(apps).where(apps.c.name == name)).first()
        found = None if row is None else AppPolicy(
            name=row.name, credential=row.secret_hash,
            senders=tuple(row.allowed_senders or ()),
            connections=tuple(row.allowed_connections or ()), rate=row.rate_limit)
        with self._lock:
            if len(self._policies) > 10_000:  # names are attacker-chosen: bound the cache
                self._policies.clear()
            self._policies[name] = (found, now + POLICY_TTL)
        return found

    def authenticate(self, name: str, secret: str) -> AppPolicy | None:
        """The app whose credentials these are, or None. Cheap (a keyed hash and a cached
        lookup) for every app created since secrets were hashed this way."""
        app = self.policy(name) if len(name) <= 64 and len(secret) <= 200 else None
        if app is None:
            return None
        stored = app.credential
        if stored.startswith(_HMAC_PREFIX):
            ok = hmac.compare_digest(stored, self._digest(name, secret))
        else:
            ok = self._legacy_check(name, stored, secret)
        if not ok:
            return None
        self._touch(name)
        return self.policy(name)

    def _legacy_check(self, name: str, stored: str, secret: str) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            self._legacy.submit(_legacy_hasher().verify, stored, secret).result()
        except (VerificationError, InvalidHashError):
            return False
        with write_transaction(self.engine) as conn:  # re-store it the new way, once
            conn.execute(update(apps).where(apps.c.name == name, apps.c.secret_hash == stored)
                         .values(secret_hash=self._digest(name, secret)))
        self._forget(name)
        return True

    def _touch(self, name: str) -> None:
        # last_used_at is for `app list`: to the minute is enough, and a write per message
        # would cost every send a transaction.
        now = time.time()
        with self._lock:
            if self._touched.get(name, 0.0) > now - 60:
                return
            self._touched[name] = now
        with write_transaction(self.engine) as conn:
            conn.execute(update(apps).where(apps.c.name == name).values(last_used_at=now))

    def verify(self, name: str, secret: str) -> bool:
        return self.authenticate(name, secret) is not None

    def verify_api_key(self, token: str) -> str | None:
        """The app a Bearer token belongs to, or None."""
        name, dot, secret = token.rpartition(".")
        if not dot or not name or not secret:
            return None
        app = self.authenticate(name, secret)
        return None if app is None else app.name

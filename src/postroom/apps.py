"""App credentials: what an application uses to hand mail in (SMTP AUTH user + secret).

Secrets are shown once at creation and stored argon2id-hashed. Verifications that succeeded
are remembered briefly (keyed by a SHA-256 of the secret, never the secret) so a client that
authenticates on every connection does not pay argon2's deliberate cost each time.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import threading
import time
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from postroom.exceptions import MessageError
from postroom.store.db import write_transaction
from postroom.store.schema import apps

NAME_RULE = "1-64 characters: letters, digits, '.', '_', '-', '@'"
_CACHE_TTL = 300.0
_hasher: Any = None


def hasher() -> Any:
    """argon2id with the library's defaults (RFC 9106). Imported on first use: most servers
    only accept mail from this machine and never check a password."""
    global _hasher
    if _hasher is None:
        from argon2 import PasswordHasher

        _hasher = PasswordHasher()
    return _hasher


def _check_name(name: str) -> None:
    ok = 1 <= len(name) <= 64 and all(c.isalnum() or c in "._-@" for c in name) and name.isascii()
    if not ok:
        raise MessageError(f"invalid app name {name!r}: {NAME_RULE}", code="app.name")


class Apps:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ok: dict[str, tuple[bytes, float, str]] = {}  # name -> (digest, until, hash)
        self._lock = threading.Lock()

    def add(self, name: str) -> str:
        """Create an app; returns its secret (the only time it is visible)."""
        _check_name(name)
        # A letter first: a secret starting with "-" would be read as an option by the
        # command-line tools people paste it into (swaks, msmtp, curl).
        secret = secrets.choice(string.ascii_letters) + secrets.token_urlsafe(24)
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    insert(apps).values(
                        name=name, secret_hash=hasher().hash(secret), created_at=time.time()
                    )
                )
        except IntegrityError as err:
            raise MessageError(
                f"an app named {name!r} exists; remove it first or pick another name",
                code="app.exists",
            ) from err
        return secret

    @staticmethod
    def api_key(name: str, secret: str) -> str:
        """The HTTP API's Bearer token for an app: its name and secret in one string (the
        secret alphabet has no '.', so the last '.' separates them)."""
        return f"{name}.{secret}"

    def verify_api_key(self, token: str) -> str | None:
        """The app a Bearer token belongs to, or None."""
        name, dot, secret = token.rpartition(".")
        if not dot or not name or not secret:
            return None
        return name if self.verify(name, secret) else None

    def remove(self, name: str) -> bool:
        with self._lock:
            self._ok.pop(name, None)
        with write_transaction(self.engine) as conn:
            return bool(conn.execute(delete(apps).where(apps.c.name == name)).rowcount)

    def list(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(apps.c.name, apps.c.created_at, apps.c.last_used_at).order_by(apps.c.name)
            )
            return [dict(r._mapping) for r in rows]

    def verify(self, name: str, secret: str) -> bool:
        digest = hashlib.sha256(f"{name}\0{secret}".encode()).digest()
        now = time.monotonic()
        # Always look the app up: `postroom app remove` runs in another process, so the
        # cache cannot be told; only the argon2 check is skipped on a hit for the same hash.
        with self.engine.connect() as conn:
            stored = conn.execute(select(apps.c.secret_hash).where(apps.c.name == name)).scalar()
        with self._lock:
            hit = self._ok.get(name)
        if (hit is not None and stored is not None and hit[1] > now and hit[2] == stored
                and secrets.compare_digest(hit[0], digest)):
            return True
        if stored is None:
            hasher().hash(secret)  # same cost as a real check: no user enumeration by timing
            return False
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            hasher().verify(stored, secret)
        except (VerificationError, InvalidHashError):
            return False
        with self._lock:
            self._ok[name] = (digest, now + _CACHE_TTL, stored)
        with write_transaction(self.engine) as conn:
            conn.execute(update(apps).where(apps.c.name == name).values(last_used_at=time.time()))
        return True

"""The web admin's sessions, kept in the database (every node sees a logout at once).

The cookie holds a 256-bit random token; the table holds only its SHA-256, so a copy of the
database does not log anyone in (the token is random: a plain hash is enough, no key and no
slow hash needed). A session ends when it has been idle ``[admin] session_idle`` seconds,
``session_max`` seconds after login anyway, when its account is removed, or when the
account's password changes after it began. Its role is the account's at each request, so a
demotion applies to open sessions at once.

Each session has its own CSRF token (sent back in a form field or the ``X-CSRF-Token``
header on every state-changing request, compared in constant time by :func:`csrf_ok`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import Engine, delete, insert, or_, select, update

from postroom.admin.accounts import Account
from postroom.admin.config import AdminSettings
from postroom.audit import Role
from postroom.store.db import write_transaction
from postroom.store.schema import admin_accounts, admin_sessions

TOUCH_EVERY = 30.0  # seconds: last_seen_at is written at most this often, not per request
TOKEN_MAX = 128  # a cookie longer than any token we issue is not looked up


class SessionKind(enum.StrEnum):
    PASSWORD = "password"
    SSO = "sso"


@dataclass(frozen=True)
class Session:
    id_hash: str
    account: str
    role: Role
    csrf: str
    created_at: float
    last_seen_at: float
    expires_at: float
    kind: str  # "password" | "sso"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_ok(session: Session, sent: str | None) -> bool:
    """Whether ``sent`` is this session's CSRF token (constant time)."""
    if not sent or not sent.isascii():
        return False
    return hmac.compare_digest(session.csrf.encode(), sent.encode())


class Sessions:
    def __init__(self, engine: Engine, settings: AdminSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock

    def create(self, account: Account, ip: str, *, kind: str = SessionKind.PASSWORD
               ) -> tuple[str, Session]:
        """A new session: (the token for the cookie, the session). Sessions that ended are
        cleared out at the same time, so the table holds only live ones."""
        which = SessionKind(kind)  # ValueError on anything else: a programming error
        now = self.clock()
        token = secrets.token_urlsafe(32)
        session = Session(id_hash=token_hash(token), account=account.name, role=account.role,
                          csrf=secrets.token_urlsafe(32), created_at=now, last_seen_at=now,
                          expires_at=now + self.settings.session_max, kind=which.value)
        t = admin_sessions
        with write_transaction(self.engine) as conn:
            conn.execute(delete(t).where(or_(
                t.c.expires_at <= now, t.c.last_seen_at < now - self.settings.session_idle)))
            conn.execute(insert(t).values(
                id_hash=session.id_hash, account=session.account, role=session.role.value,
                csrf=session.csrf, kind=which.value, ip=ip[:64], created_at=now,
                last_seen_at=now, expires_at=session.expires_at))
        return token, session

    def lookup(self, token: str, now: float | None = None) -> Session | None:
        """The live session this cookie token opens, or None."""
        if not token or len(token) > TOKEN_MAX or not token.isascii():
            return None
        now = self.clock() if now is None else now
        t, a = admin_sessions, admin_accounts
        id_hash = token_hash(token)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t, a.c.role.label("account_role"), a.c.password_changed_at)
                .join(a, a.c.name == t.c.account, isouter=True)
                .where(t.c.id_hash == id_hash)).first()
        if row is None:
            return None
        if (row.account_role is None or now >= row.expires_at
                or now - row.last_seen_at > self.settings.session_idle
                or row.password_changed_at > row.created_at):
            with write_transaction(self.engine) as conn:
                conn.execute(delete(t).where(t.c.id_hash == id_hash))
            return None
        session = Session(id_hash=id_hash, account=row.account, role=Role(row.account_role),
                          csrf=row.csrf, created_at=row.created_at,
                          last_seen_at=row.last_seen_at, expires_at=row.expires_at,
                          kind=row.kind)
        if now - row.last_seen_at >= TOUCH_EVERY:
            with write_transaction(self.engine) as conn:
                conn.execute(update(t).where(t.c.id_hash == id_hash).values(last_seen_at=now))
            session = replace(session, last_seen_at=now)
        return session

    def revoke(self, token: str) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(delete(admin_sessions).where(
                admin_sessions.c.id_hash == token_hash(token)))

    def revoke_account(self, name: str) -> int:
        with write_transaction(self.engine) as conn:
            return int(conn.execute(delete(admin_sessions).where(
                admin_sessions.c.account == name)).rowcount or 0)

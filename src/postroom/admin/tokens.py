"""Admin API tokens: ``Authorization: Bearer prt_<id>_<secret>`` on ``/api/v1/admin``.

A token acts as its account, with the account's role at each request (a demotion or removal
applies at once). Shown once at creation; stored as an HMAC-SHA256 under a subkey of the
instance key, as app secrets are (postroom.apps): the secret is 256 random bits, so a slow
hash would add nothing but a cost per request that anyone could make us pay.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from postroom.audit import Action, Actor, ActorKind, Role, record
from postroom.exceptions import MessageError
from postroom.secrets import LazyKey
from postroom.store.db import write_transaction
from postroom.store.schema import admin_accounts, admin_tokens

PREFIX = "prt_"
TOKEN_MAX = 200  # a Bearer value longer than any token we issue is not looked up
LABEL_MAX = 100
TOUCH_EVERY = 60.0  # last_used_at is for the list: to the minute is enough
_PURPOSE = b"postroom admin token v1"


class AdminTokens:
    def __init__(self, engine: Engine, key: bytes | Callable[[], bytes], *,
                 clock: Callable[[], float] = time.time) -> None:
        """``key``: the instance key (or a function loading it on first use)."""
        self.engine = engine
        self.clock = clock
        self._mac_key = LazyKey(key, _PURPOSE)
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def _digest(self, token_id: str, secret: str) -> str:
        mac = hmac.new(self._mac_key(), f"{token_id}\0{secret}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def create(self, account: str, label: str, *, actor: Actor) -> str:
        """A new token for ``account``; returned here only, never again."""
        account = account.strip().lower()
        label = " ".join(label.split())
        if len(label) > LABEL_MAX or not label.isprintable():
            raise MessageError(f"token label: at most {LABEL_MAX} printable characters",
                               code="admin.token_label")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with write_transaction(self.engine) as conn:
            if conn.execute(select(admin_accounts.c.name)
                            .where(admin_accounts.c.name == account)).first() is None:
                raise MessageError(f"no admin account named {account!r}; see `postroom admin "
                                   "list`", code="admin.unknown")
            conn.execute(insert(admin_tokens).values(
                id=token_id, account=account, label=label,
                token_hash=self._digest(token_id, secret), created_at=self.clock()))
            record(conn, actor, Action.TOKEN_ADD, f"token:{token_id}",
                   {"account": account, "label": label})
        return f"{PREFIX}{token_id}_{secret}"

    def check(self, token: str, ip: str | None = None) -> Actor | None:
        """The actor a Bearer token stands for (its account, with the account's current
        role), or None."""
        if len(token) > TOKEN_MAX or not token.startswith(PREFIX) or not token.isascii():
            return None
        token_id, sep, secret = token[len(PREFIX):].partition("_")
        if not sep or not token_id or not secret:
            return None
        t, a = admin_tokens, admin_accounts
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.token_hash, t.c.account, t.c.last_used_at, a.c.role)
                               .join(a, a.c.name == t.c.account)
                               .where(t.c.id == token_id)).first()
        if row is None or not hmac.compare_digest(row.token_hash, self._digest(token_id, secret)):
            return None
        self._touch(token_id, row.last_used_at)
        return Actor(kind=ActorKind.TOKEN.value, name=row.account, role=Role(row.role), ip=ip)

    def _touch(self, token_id: str, last: float | None) -> None:
        now = self.clock()
        with self._lock:
            seen = max(self._touched.get(token_id, 0.0), last or 0.0)
            if now - seen < TOUCH_EVERY:
                return
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[token_id] = now
        with write_transaction(self.engine) as conn:
            conn.execute(update(admin_tokens).where(admin_tokens.c.id == token_id)
                         .values(last_used_at=now))

    def list(self, account: str | None = None) -> list[dict[str, Any]]:
        t = admin_tokens
        q = select(t.c.id, t.c.account, t.c.label, t.c.created_at, t.c.last_used_at)
        if account is not None:
            q = q.where(t.c.account == account.strip().lower())
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(t.c.account, t.c.created_at))]

    def revoke(self, token_id: str, *, actor: Actor) -> bool:
        token_id = token_id.removeprefix(PREFIX).partition("_")[0]
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(admin_tokens.c.account, admin_tokens.c.label)
                               .where(admin_tokens.c.id == token_id)).first()
            if row is None:
                return False
            conn.execute(delete(admin_tokens).where(admin_tokens.c.id == token_id))
            record(conn, actor, Action.TOKEN_REMOVE, f"token:{token_id}",
                   {"account": row.account, "label": row.label})
        return True

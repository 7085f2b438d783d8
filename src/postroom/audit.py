"""The audit log: who did what, when, to which object, from where.

One writer (:func:`record`) and one reader (:func:`read`) over the ``audit`` table; the
vocabulary of what can be done is closed (:class:`Action`). Every change an admin account, an
admin API token, the setup link or a local command makes is recorded, in the same database
transaction as the change itself when the caller hands its connection in, so a change never
commits without its row (nor a row without its change).

``detail`` may carry a configuration's before and after; any key that names a secret is
replaced by ``********`` at any depth before it is written, so no secret reaches the table.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

# The database is imported by record() and read(), not with this module: Role and Actor are
# imported by postroom.admin.config, which postroom-sendmail loads when its configuration
# file (often the server's own) has an [admin] section.

MASK = "********"
# A key is a secret's when one of its words (split on _ - . and case changes) is one of
# these. Keys ending in _env or _file are references to a secret (an environment variable's
# name, a path), not the secret: they are kept, so an edit to them stays readable.
SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "secrets", "token", "tokens",
    "key", "keys", "apikey", "credential", "credentials", "cookie", "authorization", "totp",
    "otp", "private", "ciphertext", "verifier", "csrf", "hash",
})
_REFERENCE_SUFFIXES = ("_env", "_file")
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Bounds on what one row holds: detail is written by admin actions, which an attacker
# holding a session could otherwise make arbitrarily large.
MAX_STRING = 2000
MAX_DETAIL = 64 * 1024
MAX_DEPTH = 8
READ_LIMIT = 1000


class Role(enum.StrEnum):
    """What an account (and its sessions and API tokens) may do."""

    ADMIN = "admin"  # everything
    VIEWER = "viewer"  # read only


class Action(enum.StrEnum):
    """Everything the audit log records: one member per kind of change."""

    LOGIN = "login"
    LOGIN_FAILED = "login.failed"
    LOGOUT = "logout"
    SETUP = "setup"
    ACCOUNT_ADD = "account.add"
    ACCOUNT_REMOVE = "account.remove"
    ACCOUNT_PASSWORD = "account.password"
    ACCOUNT_ROLE = "account.role"
    ACCOUNT_TOTP = "account.totp"
    ACCOUNT_PUSH = "account.push"  # a browser subscribed to (or removed from) Web Push alerts
    TOKEN_ADD = "token.add"
    TOKEN_REMOVE = "token.remove"
    MESSAGE_VIEW_BODY = "message.view_body"
    MESSAGE_RESEND = "message.resend"
    MESSAGE_RETRY = "message.retry"
    MESSAGE_DELETE = "message.delete"
    MESSAGE_EXPORT = "message.export"
    QUEUE_PAUSE = "queue.pause"
    QUEUE_RESUME = "queue.resume"
    CONNECTION_ADD = "connection.add"
    CONNECTION_EDIT = "connection.edit"
    CONNECTION_DELETE = "connection.delete"
    CONNECTION_PAUSE = "connection.pause"
    CONNECTION_RESUME = "connection.resume"
    CONNECTION_TEST = "connection.test"
    ROUTE_ADD = "route.add"
    ROUTE_EDIT = "route.edit"
    ROUTE_DELETE = "route.delete"
    APP_ADD = "app.add"
    APP_ROTATE = "app.rotate"
    APP_REMOVE = "app.remove"
    APP_LIMITS = "app.limits"
    SETTINGS_CHANGE = "settings.change"
    CONFIG_EXPORT = "config.export"
    CONFIG_IMPORT = "config.import"
    DKIM_GENERATE = "dkim.generate"
    SUPPRESSION_ADD = "suppression.add"
    SUPPRESSION_REMOVE = "suppression.remove"
    SUPPRESSION_IMPORT = "suppression.import"


class ActorKind(enum.StrEnum):
    ADMIN = "admin"  # a logged-in account
    TOKEN = "token"  # an admin API token, acting as its account
    SSO = "sso"  # an account signed in by the trusted reverse proxy
    CLI = "cli"  # a local command; name = the OS user
    SETUP = "setup"  # the one-time setup link creating the first account


@dataclass(frozen=True)
class Actor:
    """Who is acting: written into every audit row, asked before every action."""

    kind: str  # an ActorKind value
    name: str  # the account's name (the OS user's for "cli")
    role: Role
    ip: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"

    def may(self, need: Role) -> bool:
        return self.role is Role.ADMIN or need is Role.VIEWER

    @classmethod
    def cli(cls) -> Actor:
        """The OS user running a local command: whoever can run it can read the database
        and the key anyway, so it acts as an admin."""
        import getpass
        import os

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (a container running as a bare uid)
            user = f"uid{os.getuid()}"
        return cls(kind=ActorKind.CLI.value, name=user, role=Role.ADMIN)


def _is_secret(key: str) -> bool:
    if key.lower().endswith(_REFERENCE_SUFFIXES):
        return False
    return any(w.lower() in SECRET_WORDS for w in _WORD.findall(key))


def redact(value: Any, depth: int = 0) -> Any:
    """``value`` with every secret-named key's value masked, at any depth, and every string
    cut to MAX_STRING characters."""
    if depth > MAX_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): MASK if _is_secret(str(k)) and v not in (None, "")
                else redact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v, depth + 1) for v in value]
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "…"
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value), depth)


def _detail_text(detail: Mapping[str, Any] | None) -> str:
    text = json.dumps(redact(detail or {}), ensure_ascii=False, sort_keys=True)
    if len(text) > MAX_DETAIL:
        text = json.dumps({"truncated": True, "size": len(text)})
    return text


def record(where: Engine | Connection, actor: Actor, action: Action, obj: str = "",
           detail: Mapping[str, Any] | None = None) -> None:
    """Write one audit row. Given a Connection, the row is part of that transaction."""
    from sqlalchemy import Connection, insert

    from postroom.store.db import write_transaction
    from postroom.store.schema import audit as table

    values = {"at": time.time(), "actor": actor.label[:160], "action": Action(action).value,
              "object": obj[:200], "detail": _detail_text(detail),
              "ip": (actor.ip or None) and actor.ip[:64]}
    if isinstance(where, Connection):
        where.execute(insert(table).values(**values))
        return
    with write_transaction(where) as conn:
        conn.execute(insert(table).values(**values))


def read(engine: Engine, *, since: float | None = None, actor: str | None = None,
         action: str | None = None, obj: str | None = None,
         before: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Rows newest first. ``actor``: a label ("admin:alice"), a name ("alice") or a kind
    ("cli"); ``action``: one ("account.add") or a group ("account"); ``before``: the id of
    the last row of the previous page."""
    from sqlalchemy import and_, or_, select

    from postroom.store.schema import audit as table

    q = select(table).order_by(table.c.id.desc()).limit(max(1, min(limit, READ_LIMIT)))
    if since is not None:
        q = q.where(table.c.at >= since)
    if before is not None:
        q = q.where(table.c.id < before)
    if actor:
        q = q.where(table.c.actor == actor if ":" in actor else or_(
            table.c.actor.like(f"%:{_like(actor)}", escape="\\"),
            table.c.actor.like(f"{_like(actor)}:%", escape="\\")))
    if action:
        q = q.where(or_(table.c.action == action,
                        and_(table.c.action.like(f"{_like(action)}.%", escape="\\"))))
    if obj:
        q = q.where(table.c.object == obj)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return [{"id": r.id, "at": r.at, "actor": r.actor, "action": r.action, "object": r.object,
             "detail": json.loads(r.detail or "{}"), "ip": r.ip} for r in rows]


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

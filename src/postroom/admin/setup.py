"""The one-time setup link that creates the first admin account.

``postroom serve`` prints it at start while no account exists: whoever can read the
server's output (its console or journal) may create the first admin, and no one else. The
link carries 256 random bits; only their SHA-256 is kept (in ``control``), with an expiry
of 24 hours. Each start replaces the previous link; the first account created, by the link
or by `postroom admin add`, ends it. Two browsers submitting it at once get one account:
using it deletes its row, and only one transaction can delete it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable

from sqlalchemy import Engine, delete, func, insert, select

from postroom.admin.accounts import Account, Accounts, check_name
from postroom.audit import Action, Actor, ActorKind, Role, record
from postroom.exceptions import MessageError
from postroom.store.db import write_transaction
from postroom.store.schema import admin_accounts, control

CONTROL_NAME = "admin.setup"
VALID_FOR = 24 * 3600.0
TOKEN_MAX = 128
SETUP_PATH = "/admin/setup"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def setup_link(engine: Engine, key: bytes | Callable[[], bytes] | None, base_url: str, *,
               now: float | None = None) -> str | None:
    """A fresh one-time link ``{base_url}/admin/setup?token=...`` while no account exists
    (replacing any earlier one), else None (and any earlier link is ended).

    ``key`` is not needed (the token is random, so a plain hash stores it safely, as for
    sessions); it is accepted so callers need not change if that ever does."""
    del key
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    with write_transaction(engine) as conn:
        conn.execute(delete(control).where(control.c.name == CONTROL_NAME))
        if conn.execute(select(admin_accounts.c.name).limit(1)).first() is not None:
            return None
        conn.execute(insert(control).values(
            name=CONTROL_NAME, updated_at=now,
            value=json.dumps({"hash": _hash(token), "expires_at": now + VALID_FOR})))
    return f"{base_url.rstrip('/')}{SETUP_PATH}?token={token}"


def _refused(why: str, code: str) -> MessageError:
    return MessageError(f"{why}; restart `postroom serve` for a new setup link, or create an "
                        "account with `postroom admin add NAME`", code=f"admin.setup.{code}")


def setup_pending(engine: Engine, token: str, *, now: float | None = None) -> bool:
    """Whether ``token`` is the live setup link's (to show the form, or say why not)."""
    try:
        _live(engine, token, time.time() if now is None else now)
    except MessageError:
        return False
    return True


def _live(engine: Engine, token: str, now: float) -> str:
    """The stored value of the live link ``token`` belongs to; MessageError if none."""
    if not token or len(token) > TOKEN_MAX:
        raise _refused("this setup link is not valid", "bad")
    with engine.connect() as conn:
        value = conn.execute(select(control.c.value)
                             .where(control.c.name == CONTROL_NAME)).scalar()
    if value is None:
        raise _refused("this setup link was used or replaced", "used")
    stored = json.loads(value)
    if not hmac.compare_digest(str(stored.get("hash", "")), _hash(token)):
        raise _refused("this setup link is not valid (or was replaced)", "bad")
    if float(stored.get("expires_at", 0)) <= now:
        raise _refused("this setup link has expired (they last 24 hours)", "expired")
    return str(value)


def use_setup_token(engine: Engine, token: str, name: str, password: str, *, ip: str,
                    accounts: Accounts | None = None, now: float | None = None) -> Account:
    """Create the first admin account with the setup link's ``token``: once, by one caller."""
    now = time.time() if now is None else now
    value = _live(engine, token, now)
    name = check_name(name)
    # The key encrypts TOTP secrets only; a new account has none.
    accts = accounts or Accounts(engine, b"")
    digest = accts.hash_password(password, name=name)  # refused here: the link stays usable
    actor = Actor(kind=ActorKind.SETUP.value, name=name, role=Role.ADMIN, ip=ip)
    with write_transaction(engine) as conn:
        won = conn.execute(delete(control).where(control.c.name == CONTROL_NAME,
                                                 control.c.value == value)).rowcount
        if not won:
            raise _refused("this setup link was just used", "used")
        if conn.execute(select(func.count()).select_from(admin_accounts)).scalar():
            raise _refused("an admin account exists already", "done")
        Accounts.insert(conn, name, digest, Role.ADMIN, now)
        record(conn, actor, Action.SETUP, f"account:{name}", {"role": Role.ADMIN.value})
    return Account(name=name, role=Role.ADMIN, created_at=now, last_login_at=None, totp=False)

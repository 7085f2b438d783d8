"""Where grants live: the ``oauth_grants`` table (tokens Fernet-encrypted with the instance
key, like every stored secret) and ``oauth_pending`` (authorizations under way: ``state`` ->
PKCE verifier, kept in the database so that the callback may reach any node).

``oauth_pending`` also remembers the sign-in tickets already used (rows whose ``state`` is
``ticket:<nonce>``): a ticket opens one sign-in, once, on whichever node or process it is
presented, and after a restart too. Such a row is kept until well after its ticket expired
(``created_at`` is the ticket's expiry), then swept with the stale authorizations."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from postroom.secrets import Vault
from postroom.store.db import write_transaction
from postroom.store.schema import oauth_grants, oauth_pending

PENDING_SECONDS = 900.0  # an authorization not finished within 15 minutes is forgotten
TICKET_PREFIX = "ticket:"  # oauth_pending rows that record a used ticket, not an authorization
_SECRET = ("access_token", "refresh_token")


@dataclass
class Grant:
    connection: str
    provider: str
    client_id: str
    grant_type: str  # authorization_code | device_code | client_credentials | service_account
    scopes: tuple[str, ...]
    granted_at: float
    account: str | None = None
    access_token: str | None = None
    refresh_token: str | None = None
    expires_at: float | None = None
    issued_at: float | None = None
    refresh_expires_at: float | None = None
    last_refresh_at: float | None = None
    last_used_at: float | None = None
    refreshes: int = 0
    generation: int = 0
    state: str = "ok"  # ok | dead (the provider refused the refresh token: sign in again)
    last_error: str | None = None
    last_error_code: str | None = None
    last_error_at: float | None = None

    @property
    def user(self) -> bool:
        """A person's grant (with a refresh token), not an app-only one."""
        return self.grant_type in ("authorization_code", "device_code")


@dataclass(frozen=True)
class Pending:
    state: str
    connection: str
    verifier: str
    redirect_uri: str
    created_at: float


class GrantStore:
    def __init__(self, engine: Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault

    def _row_to_grant(self, row: Any) -> Grant:
        values = dict(row._mapping)
        for key in _SECRET:
            if values[key] is not None:
                values[key] = self.vault.decrypt(values[key])
        values["scopes"] = tuple(values["scopes"].split())
        return Grant(**values)

    def _columns(self, values: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        for key in _SECRET:
            if out.get(key) is not None:
                out[key] = self.vault.encrypt(out[key])
        if "scopes" in out:
            out["scopes"] = " ".join(out["scopes"])
        return out

    def get(self, connection: str, conn: Connection | None = None) -> Grant | None:
        query = select(oauth_grants).where(oauth_grants.c.connection == connection)
        if conn is not None:
            row = conn.execute(query).first()
        else:
            with self.engine.connect() as c:
                row = c.execute(query).first()
        return None if row is None else self._row_to_grant(row)

    def all(self) -> list[Grant]:
        with self.engine.connect() as c:
            rows = c.execute(select(oauth_grants).order_by(oauth_grants.c.connection)).all()
        return [self._row_to_grant(r) for r in rows]

    def put(self, grant: Grant) -> None:
        """Store a new grant for its connection, replacing any earlier one."""
        values = self._columns({f.name: getattr(grant, f.name) for f in fields(Grant)})
        with write_transaction(self.engine) as c:
            c.execute(delete(oauth_grants).where(oauth_grants.c.connection == grant.connection))
            c.execute(insert(oauth_grants).values(**values))

    def update(self, connection: str, **values: Any) -> None:
        with write_transaction(self.engine) as c:
            c.execute(update(oauth_grants).where(oauth_grants.c.connection == connection)
                      .values(**self._columns(values)))

    def remove(self, connection: str) -> bool:
        with write_transaction(self.engine) as c:
            gone = c.execute(delete(oauth_grants)
                             .where(oauth_grants.c.connection == connection)).rowcount
        return bool(gone)

    # -- authorizations under way ------------------------------------------------------------
    def add_pending(self, p: Pending) -> None:
        with write_transaction(self.engine) as c:
            c.execute(delete(oauth_pending)
                      .where(oauth_pending.c.created_at < p.created_at - PENDING_SECONDS))
            c.execute(insert(oauth_pending).values(
                state=p.state, connection=p.connection, verifier=self.vault.encrypt(p.verifier),
                redirect_uri=p.redirect_uri, created_at=p.created_at))

    def use_ticket(self, nonce: str, connection: str, until: float) -> bool:
        """Record that the ticket ``nonce`` (valid until ``until``) was used; False when it
        had been used before, by this process or any other sharing the database."""
        try:
            with write_transaction(self.engine) as c:
                # The primary key decides between two simultaneous uses: one insert wins.
                c.execute(insert(oauth_pending).values(
                    state=f"{TICKET_PREFIX}{nonce}", connection=connection, verifier="",
                    redirect_uri="", created_at=until))
        except IntegrityError:
            return False
        return True

    def take_pending(self, state: str, now: float | None = None) -> Pending | None:
        """The authorization ``state`` belongs to, removed (a state is good for one use)."""
        now = time.time() if now is None else now
        if state.startswith(TICKET_PREFIX):  # a used ticket is no authorization
            return None
        with write_transaction(self.engine) as c:
            row = c.execute(select(oauth_pending).where(oauth_pending.c.state == state)).first()
            if row is None:
                return None
            c.execute(delete(oauth_pending).where(oauth_pending.c.state == state))
        if row.created_at < now - PENDING_SECONDS:
            return None
        return Pending(row.state, row.connection, self.vault.decrypt(row.verifier),
                       row.redirect_uri, row.created_at)

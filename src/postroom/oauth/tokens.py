"""Access tokens for the transports: cached, refreshed ahead of expiry, once, under a lock.

The :class:`TokenManager` is the ``TokenProvider`` of postroom.transports.base (``token()``,
called from the SMTP transport's threads) and has ``atoken()`` for the HTTP transports.

- An access token is used from memory until ``margin`` before it expires (10 % of its
  lifetime, at most 5 minutes), then refreshed. Every refresh happens under a lock that
  every thread, worker process and node shares: a PostgreSQL advisory lock, or on SQLite a
  ``flock`` on a file beside the database. Whoever gets the lock second finds the new token
  in the database and uses it: one refresh, never two, and a rotated refresh token is never
  lost to a race (two refreshes with the same rotating token: the second kills the grant).
- A token the server refused (HTTP 401, SMTP 535) is refreshed once, unless another worker
  has replaced it meanwhile; then that one is used.
- A refresh the provider refuses for good (``invalid_grant``...) marks the grant *dead* and
  records an event with the sign-in link; while dead, deliveries fail at once with that
  explanation as a *transient* error (the mail stays queued) and the provider is asked again
  at most every ``DEAD_RETRY`` seconds, until someone signs in again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, text

from postroom import events
from postroom.events import Kind
from postroom.exceptions import AuthError, ConfigError, DeliveryError, PostroomError
from postroom.oauth import client as oauth_client
from postroom.oauth import errors, providers
from postroom.oauth.config import OAuthSettings
from postroom.oauth.errors import GrantError
from postroom.oauth.store import Grant, GrantStore
from postroom.secrets import Vault
from postroom.settings import ConnectionBase, Settings
from postroom.store.db import is_postgresql, write_transaction

log = logging.getLogger(__name__)
MARGIN_MAX = 300.0  # refresh at most this long before expiry...
MARGIN_SHARE = 0.1  # ...and at most this share of the token's lifetime before it
DEAD_RETRY = 300.0  # a dead grant is tried again at most this often (in case it recovered)
USED_EVERY = 3600.0  # last_used_at is written at most this often per process and connection
LOCK_TIMEOUT = 60.0  # waiting for another process's refresh (which is bounded by its timeout)
FRESH_REFUSED = 30.0  # a token refused this soon after a refresh is not refreshed again


def margin(lifetime: float) -> float:
    return max(0.0, min(MARGIN_MAX, lifetime * MARGIN_SHARE))


@dataclass(frozen=True)
class _Cached:
    token: str
    refresh_at: float  # use it until then
    expires_at: float | None
    generation: int


def _transport_kind(conn: ConnectionBase) -> str:
    return conn.transport


def _account_of(conn: ConnectionBase) -> str | None:
    for key in ("username", "mailbox", "user"):
        value = getattr(conn, key, None)
        if isinstance(value, str) and value and value != "me":
            return value
    return None


class TokenManager:
    """Tokens of every OAuth connection of one instance."""

    def __init__(self, settings: Settings, engine: Engine, key: bytes, *,
                 clock: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.key = key
        self.store = GrantStore(engine, Vault(key))
        self.clock = clock
        self.transport = transport  # tests: an httpx.MockTransport in front of a provider
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._handed = threading.local()  # per thread: connection -> the token it was given
        self._used_written: dict[str, float] = {}
        self._endpoints: dict[str, providers.Endpoints] = {}

    # -- configuration -----------------------------------------------------------------------
    def connections(self) -> list[ConnectionBase]:
        return [c for c in self.settings.connections if c.oauth is not None]

    def config(self, name: str) -> tuple[ConnectionBase, OAuthSettings]:
        conn = self.settings.connection(name)
        if conn.oauth is None:
            raise ConfigError(
                f"connection {name!r} has no oauth table: add oauth = {{ provider = "
                "\"google\" | \"microsoft\" | \"yahoo\" | \"generic\", client_id = \"...\" }} "
                "to it in postroom.toml", code="config.oauth.missing")
        return conn, conn.oauth

    def endpoints(self, name: str) -> providers.Endpoints:
        if name not in self._endpoints:
            conn, cfg = self.config(name)
            self._endpoints[name] = providers.endpoints(cfg, _transport_kind(conn), name)
        return self._endpoints[name]

    @property
    def public_url(self) -> str:
        s = self.settings
        if s.oauth.public_url:
            return s.oauth.public_url.rstrip("/")
        listen = s.http_listen or ("127.0.0.1", 8025)
        host = listen[0] if listen[0] not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{listen[1]}"

    def redirect_uri(self, name: str) -> str:
        _, cfg = self.config(name)
        return cfg.redirect_uri or f"{self.public_url}/oauth/callback"

    def start_link(self, name: str) -> str:
        return f"{self.public_url}/oauth/start/{name}"

    def sign_in_link(self, name: str) -> str:
        """The sign-in link to offer in errors and checks; "" when no Postroom serves it (no
        [oauth] public_url and server.http_listen = ""): a link there would lead nowhere."""
        s = self.settings
        return self.start_link(name) if s.oauth.public_url or s.http_listen else ""

    def relogin(self, name: str) -> dict[str, str]:
        """The ``link`` and ``signin`` fill of errors.failure: how to sign in on this
        instance (the device flow only where the provider allows it the mail scopes)."""
        link = self.sign_in_link(name)
        try:
            ep = self.endpoints(name)
        except PostroomError:  # a broken oauth table: its own error says so
            return {"link": link}
        device = bool(ep.device_url) and not set(ep.scopes) & set(ep.provider.device_refuses)
        return {"link": link, "signin": errors.sign_in_how(name, link, device=device)}

    def _sign_in(self, name: str) -> str:
        fill = self.relogin(name)
        return fill.get("signin") or errors.sign_in_how(name, fill["link"])

    def account_mismatch(self, name: str, grant: Grant | None) -> str | None:
        """Why the server will refuse the grant's tokens when the account that signed in is
        not the connection's username (None when they agree or either is unknown)."""
        conn = self.settings.connection(name)
        want = getattr(conn, "username", None)
        if grant is None or not grant.user or not grant.account or not isinstance(want, str):
            return None
        if grant.account.casefold() == want.casefold():
            return None
        return (f"connection {name}: the account that signed in is {grant.account}, but the "
                f"connection's username is {want}: the mail server refuses a token for another "
                f"account. Fix: set username = \"{grant.account}\", or sign in again as {want}")

    def context(self, name: str) -> oauth_client.Context:
        ep = self.endpoints(name)
        return oauth_client.Context(name, self.sign_in_link(name), ep.provider.console,
                                    self.redirect_uri(name), " ".join(ep.scopes))

    def secret(self, name: str) -> str | None:
        _, cfg = self.config(name)
        if cfg.client_secret_stored:  # made in the web admin or imported (store.dbconfig)
            from postroom.secrets import Secret, secret_name

            cipher = self._cipher(secret_name(name, Secret.OAUTH_CLIENT_SECRET))
            if cipher is None:
                raise errors.failure("secret_missing", name,
                                     said="the stored client secret is missing")
            return self.store.vault.decrypt(cipher)
        try:
            return cfg.secret(f"connection {name}")
        except AuthError as err:
            raise errors.failure("secret_missing", name,
                                 said=err.reply_text or err.message) from err

    def reconfigure(self, settings: Settings) -> None:
        """The connections changed (postroom.reload): use ``settings`` from now on."""
        self.settings = settings
        self._endpoints.clear()

    def client(self, name: str, *, redirect: bool = False, scope: bool = True) -> Any:
        _, cfg = self.config(name)
        return oauth_client.make(self.endpoints(name), cfg, secret=self.secret(name),
                                 redirect_uri=self.redirect_uri(name) if redirect else None,
                                 scope=scope, transport=self.transport)

    # -- the TokenProvider interface ----------------------------------------------------------
    def token(self, connection: str, *, refresh: bool = False,
              rejected: str | None = None) -> str:
        """An access token for ``connection``. ``refresh=True``: ``rejected`` (by default
        the one this thread was given last) was refused; get another (refreshing unless
        someone already did)."""
        conn = self.settings.connection(connection)
        if conn.oauth is None:  # a token stored by hand, as before OAuth flows existed
            return self._stored_secret(connection)
        handed: dict[str, str] = self._handed.__dict__.setdefault("tokens", {})
        if refresh and rejected is None:
            rejected = handed.get(connection)
        tok = self._token(connection, rejected=rejected, forced=refresh)
        handed[connection] = tok
        return tok

    def _cipher(self, secret: str) -> str | None:
        from sqlalchemy import select

        from postroom.store.schema import secrets as secrets_table

        with self.engine.connect() as c:
            cipher: str | None = c.execute(select(secrets_table.c.ciphertext)
                                           .where(secrets_table.c.name == secret)).scalar()
        return cipher

    def _stored_secret(self, name: str) -> str:
        cipher = self._cipher(f"connection:{name}:token")
        if cipher is None:
            raise AuthError(
                f"connection {name}: no OAuth access token; add an oauth table to the "
                "connection (then `postroom oauth login NAME`), or set oauth_token_env or "
                "oauth_token_file", code="auth.token_missing", permanent=False)
        return self.store.vault.decrypt(cipher)

    def explain(self, err: DeliveryError, transcript: str, username: str,
                connection: str | None = None) -> DeliveryError:
        """For the SMTP transport: what a refused XOAUTH2/OAUTHBEARER login means
        (postroom.oauth.errors.explain_smtp), knowing who signed in."""
        grant = self.store.get(connection) if connection else None
        account = grant.account if grant is not None and grant.user else None
        return errors.explain_smtp(err, transcript, username, account=account)

    def token_again(self, connection: str, rejected: str) -> tuple[str, str]:
        """For a server that refused ``rejected``: another token, and what was done to get
        it, in words for the session transcript (a refresh is claimed only when one was
        made here)."""
        self._handed.outcome = "stored"
        token = self.token(connection, refresh=True, rejected=rejected)
        outcome = getattr(self._handed, "outcome", "stored")
        if token == rejected:
            outcome = "stored" if outcome == "stored" else "unchanged"
        return token, _AGAIN[outcome]

    async def atoken(self, connection: str, *, rejected: str | None = None) -> str:
        """For asyncio code: ``rejected`` is a token the server refused (401)."""
        return await asyncio.to_thread(self._token, connection, rejected=rejected,
                                       forced=rejected is not None)

    # -- getting a token -------------------------------------------------------------------------
    def _token(self, name: str, *, rejected: str | None, forced: bool) -> str:
        now = self.clock()
        cached = self._cache.get(name)
        if cached is not None and now < cached.refresh_at and (
                not forced or (rejected is not None and cached.token != rejected)) and (
                self._generation(name) == cached.generation):
            # One indexed read per call (that is, per new session, not per message): a
            # token replaced elsewhere (a new sign-in, another node's refresh) is seen at once.
            self._touch(name)
            self._handed.outcome = "replaced"
            return cached.token
        with self._exclusive(name):
            grant = self.store.get(name)
            now = self.clock()
            if grant is not None and grant.access_token and grant.state == "ok":
                fresh = self._cached(grant)
                refused = forced and grant.access_token in (
                    rejected, cached.token if cached and rejected is None else None)
                if now < fresh.refresh_at and not refused:
                    # Someone (another thread, worker or node) refreshed it meanwhile.
                    self._cache[name] = fresh
                    self._handed.outcome = "replaced"
                    return fresh.token
                since = now - (grant.last_refresh_at or -1e18)
                if refused and since < FRESH_REFUSED:
                    # A token refreshed moments ago is not refused for its age: the account,
                    # the scope or the server is the problem. Another refresh would not
                    # help, and at a provider that revokes the old token on refresh it would
                    # cut off every other worker. (A token from a sign-in is refreshed: a
                    # refusal right after it may well be a grant withdrawn since.)
                    mismatch = self.account_mismatch(name, grant)
                    said = (f"the server refused an access token refreshed {since:.0f} s ago; "
                            "not refreshing it again")
                    raise GrantError(f"connection {name}: {said}"
                                     + (f". {mismatch}" if mismatch else ""),
                                     code="oauth.token_refused", reply_text=said)
            result = self._renew(name, grant)
            self._touch(name)
            self._handed.outcome = "refreshed"
            return result

    def refresh_now(self, name: str, *, unless_within: float = 60.0) -> Grant:
        """Refresh (or fetch, app-only) now, unless someone did in the last ``unless_within``
        seconds: the health check's proof that the grant still works."""
        with self._exclusive(name):
            grant = self.store.get(name)
            recent = grant is not None and grant.state == "ok" and grant.access_token and (
                self.clock() - (grant.last_refresh_at or grant.granted_at) < unless_within)
            if not recent:
                self._renew(name, grant)
        found = self.store.get(name)
        if found is None:
            raise errors.failure("no_grant", name, **self.relogin(name))
        return found

    def _generation(self, name: str) -> int:
        """The stored grant's generation (-1 when it is gone or dead)."""
        from sqlalchemy import select

        from postroom.store.schema import oauth_grants as g

        with self.engine.connect() as c:
            row = c.execute(select(g.c.generation, g.c.state)
                            .where(g.c.connection == name)).first()
        return -1 if row is None or row.state != "ok" else int(row.generation)

    def _cached(self, grant: Grant) -> _Cached:
        assert grant.access_token is not None
        if grant.expires_at is None:  # no expiry given: use it until a server refuses it
            return _Cached(grant.access_token, float("inf"), None, grant.generation)
        lifetime = grant.expires_at - (grant.issued_at or grant.expires_at)
        return _Cached(grant.access_token, grant.expires_at - margin(lifetime),
                       grant.expires_at, grant.generation)

    def _renew(self, name: str, grant: Grant | None) -> str:
        """A new access token, by refresh or (app-only) a new request. Runs under the lock."""
        _, cfg = self.config(name)
        ep = self.endpoints(name)
        now = self.clock()
        if grant is None:
            if cfg.grant == "user":
                raise errors.failure("no_grant", name, **self.relogin(name))
        elif grant.client_id != self._client_id(cfg) and grant.user:
            raise errors.failure("client_changed", name, **self.relogin(name))
        elif grant.state == "dead" and (grant.last_error_at or 0) > now - DEAD_RETRY:
            raise GrantError(grant.last_error or "the grant is dead: sign in again",
                             code=grant.last_error_code or "oauth.invalid_grant")
        try:
            if cfg.grant == "user":
                assert grant is not None
                token = self._refresh(name, grant)
            else:
                token = self._app_only(name, cfg, ep)
        except GrantError as err:
            self._failed(name, grant, err)
            # Still valid, only within the margin: use it while the provider recovers.
            if not err.dead and grant is not None and grant.access_token and (
                    grant.expires_at or 0) > now + 5:
                return grant.access_token
            raise
        return self._stored(name, grant, cfg, token)

    @staticmethod
    def _client_id(cfg: OAuthSettings) -> str:
        if cfg.grant == "service_account" and cfg.service_account_file:
            return _service_account(cfg.service_account_file).get("client_email", "")
        return cfg.client_id

    def _refresh(self, name: str, grant: Grant) -> Any:
        if not grant.refresh_token:
            raise errors.failure("invalid_grant", name, said="no refresh token was issued",
                                 **self.relogin(name))
        client = self.client(name)
        log.info("oauth: refreshing the access token of connection %s", name)
        return oauth_client.call(
            lambda: client.refresh_token(self.endpoints(name).token_url,
                                         refresh_token=grant.refresh_token),
            self.context(name))

    def _app_only(self, name: str, cfg: OAuthSettings, ep: providers.Endpoints) -> Any:
        ctx = self.context(name)
        if cfg.grant == "client_credentials":
            client = self.client(name)
            return oauth_client.call(
                lambda: client.fetch_token(ep.token_url, grant_type="client_credentials"), ctx)
        assert cfg.service_account_file is not None
        key = _service_account(cfg.service_account_file)
        conn, _ = self.config(name)
        subject = cfg.subject or _account_of(conn)
        token_url = cfg.token_url or key.get("token_uri") or ep.token_url
        assertion = _sign_assertion(key, token_url, subject, ep.scopes, self.clock())
        client = oauth_client.make(ep, cfg, secret=None, scope=False, transport=self.transport)
        return oauth_client.call(
            lambda: client.fetch_token(token_url, grant_type=oauth_client.JWT_GRANT,
                                       assertion=assertion, auth=httpx.Auth()), ctx)

    def _stored(self, name: str, grant: Grant | None, cfg: OAuthSettings, token: Any) -> str:
        now = self.clock()
        values = oauth_client.token_fields(token, now)
        if grant is None:  # the first app-only token
            conn, _ = self.config(name)
            grant = Grant(connection=name, provider=cfg.provider,
                          client_id=self._client_id(cfg),
                          grant_type="client_credentials" if cfg.grant == "client_credentials"
                          else "service_account",
                          scopes=values.pop("scopes", self.endpoints(name).scopes),
                          granted_at=now, account=values.pop("account", None)
                          or _account_of(conn), generation=1, last_refresh_at=now, **values)
            self.store.put(grant)
        else:
            was_dead = grant.state == "dead"
            values.update(last_refresh_at=now, refreshes=grant.refreshes + 1,
                          generation=grant.generation + 1, state="ok", last_error=None,
                          last_error_code=None, last_error_at=None)
            self.store.update(name, **values)
            for key, value in values.items():
                setattr(grant, key, value)
            if was_dead:
                self.event(Kind.OAUTH_RENEWED, name, "the provider accepts the grant again")
        self._cache[name] = self._cached(grant)
        return str(values["access_token"])

    def _failed(self, name: str, grant: Grant | None, err: GrantError) -> None:
        now = self.clock()
        log.warning("oauth: connection %s: %s", name, err.message)
        if grant is None:
            return
        newly_dead = err.dead and grant.state != "dead"
        self.store.update(name, state="dead" if err.dead else grant.state,
                          last_error=err.message[:2000], last_error_code=err.code,
                          last_error_at=now)
        self._cache.pop(name, None)
        if newly_dead:
            self.event(Kind.OAUTH_GRANT_DEAD, name, err.message)
            days = self.endpoints(name).provider.testing_app_days
            age = (now - grant.granted_at) / 86400
            if days and err.code == "oauth.invalid_grant" and days - 0.5 <= age <= days + 1:
                self.event(Kind.OAUTH_TESTING_APP, name, _testing_app(name, age, days,
                                                                    self._sign_in(name)))

    # -- after sign-in ---------------------------------------------------------------------------
    def save(self, name: str, token: Any, grant_type: str, *,
             account: str | None = None) -> Grant:
        """Store what a sign-in (authorization code or device code) returned; ``account``:
        who signed in, when the sign-in found out (postroom.oauth.flows.keep)."""
        _, cfg = self.config(name)
        now = self.clock()
        values = oauth_client.token_fields(token, now)
        scopes = values.pop("scopes", self.endpoints(name).scopes)
        named = values.pop("account", None)
        # Who signed in, as the provider said; never the configured account in its place:
        # `oauth login`, the checks and the mismatch advice report this one.
        account = account or named
        grant = Grant(connection=name, provider=cfg.provider, client_id=cfg.client_id,
                      grant_type=grant_type, scopes=scopes, granted_at=now, account=account,
                      generation=1, **values)
        with self._exclusive(name):
            old = self.store.get(name)
            if old is not None:
                grant.generation = old.generation + 1
            self.store.put(grant)
            self._cache[name] = self._cached(grant)
        detail = f"signed in as {account or '?'}; scopes: {' '.join(scopes)}"
        if old is not None and old.state == "dead":
            self.event(Kind.OAUTH_RENEWED, name, detail)
        else:
            self.event(Kind.OAUTH_GRANTED, name, detail)
        for warning in self.warnings(grant):
            self.event(warning[0], name, warning[1])
        self._retry_waiting(now)
        return grant

    def _retry_waiting(self, now: float) -> None:
        """Mail deferred for want of a working grant is due again at once (not at the end of
        its backoff, which may be an hour away)."""
        from sqlalchemy import func, or_, update

        from postroom.store.schema import WAITING, messages

        err = func.lower(messages.c.last_error)
        with write_transaction(self.engine) as conn:
            conn.execute(update(messages).where(
                messages.c.status.in_(WAITING), messages.c.next_attempt_at > now,
                or_(err.like("%oauth.%"), err.like("%auth.rejected.oauth%"),
                    err.like("%auth.token_missing%"))).values(next_attempt_at=now))

    def forget(self, name: str) -> Grant | None:
        with self._exclusive(name):
            grant = self.store.get(name)
            self.store.remove(name)
            self._cache.pop(name, None)
        return grant

    def missing_scopes(self, name: str, grant: Grant) -> list[str]:
        """Send scopes the grant lacks (none when the provider does not list granted ones)."""
        need = self.endpoints(name).send_scopes
        if not need or not grant.scopes:
            return []
        have = {s.lower() for s in grant.scopes}
        # Microsoft lists Graph scopes without their resource ("Mail.Send").
        have |= {s.rstrip("/").rsplit("/", 1)[-1].lower() for s in grant.scopes}

        def held(scope: str) -> bool:
            tail = scope.rstrip("/").rsplit("/", 1)[-1].lower()
            return scope.lower() in have or (bool(tail) and tail in have and "." in tail)

        return [] if any(held(s) for s in need) else list(need)

    def warnings(self, grant: Grant) -> list[tuple[Kind, str]]:
        """(event kind, text) for what is wrong with a grant that still works."""
        out: list[tuple[Kind, str]] = []
        name = grant.connection
        missing = self.missing_scopes(name, grant)
        if missing:
            out.append((Kind.OAUTH_SCOPE_MISSING, errors.failure(
                "scope_missing", name, **self.relogin(name),
                granted=" ".join(grant.scopes) or "none", needed=" or ".join(missing)).message))
        days = self.endpoints(name).provider.testing_app_days
        if days and grant.refresh_expires_at and grant.user and (
                grant.refresh_expires_at - grant.granted_at) <= (days + 1) * 86400:
            out.append((Kind.OAUTH_TESTING_APP, _testing_app(
                name, 0, days, self._sign_in(name), at_grant=True)))
        return out

    # -- bookkeeping -------------------------------------------------------------------------
    def _touch(self, name: str) -> None:
        now = self.clock()
        if now - self._used_written.get(name, -1e18) < USED_EVERY:
            return
        self._used_written[name] = now
        try:
            self.store.update(name, last_used_at=now)
        except Exception as err:  # bookkeeping only: never fail a delivery for it
            log.debug("oauth: could not note the use of %s: %s", name, err)

    def event(self, kind: Kind, name: str, detail: str, *, unless_within: float = 0) -> None:
        """Record an event for alerts; with ``unless_within``, not when the same kind was
        recorded for this connection that recently (by any node)."""
        now = self.clock()
        with write_transaction(self.engine) as conn:
            if unless_within:
                events.record_once(conn, kind, at=now, within=unless_within, connection=name,
                                   detail=detail)
            else:
                events.record(conn, kind, at=now, connection=name, detail=detail)

    @contextlib.contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """One refresh of ``name`` at a time: in this process, then across processes."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(timeout=LOCK_TIMEOUT):
            raise errors.failure("unavailable", name, said="another refresh did not finish")
        try:
            with self._across_processes(name):
                yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _across_processes(self, name: str) -> Iterator[None]:
        if is_postgresql(self.engine):
            key = int.from_bytes(hashlib.blake2b(f"postroom-oauth:{name}".encode(),
                                                 digest_size=8).digest(), "big", signed=True)
            # Held by this transaction, released at its end (commit, rollback or a dead
            # connection): a crashed refresher never leaves it locked.
            with self.engine.connect() as conn, conn.begin():
                conn.execute(text("SET LOCAL lock_timeout = '60s'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                yield
            return
        database = self.engine.url.database
        if not database or database == ":memory:":
            yield
            return
        path = Path(f"{database}.oauth-{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise errors.failure("unavailable", name,
                                             said="another process's refresh did not finish"
                                             ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the flock


# What token_again did, for the transcript ("refreshing it once" only when it did).
_AGAIN = {
    "refreshed": "refreshing it once: the provider issued a new access token",
    "replaced": "another worker had already replaced the token; trying that one (no refresh "
                "here)",
    "unchanged": "the provider gave no new token (not reachable now); not tried again",
    "stored": "the token was stored by hand (no oauth table), so nothing can refresh it; not "
              "tried again",
}


def _testing_app(name: str, age: float, days: int, link: str, *, at_grant: bool = False) -> str:
    what = ("the provider gave this grant a refresh token that dies within "
            f"{days} days" if at_grant else
            f"the grant died {age:.1f} days after sign-in")
    return (f"connection {name}: {what}: Google does this to apps whose OAuth consent screen is "
            "in \"Testing\" publishing status. Fix: in Google Cloud console > OAuth consent "
            "screen (Google Auth Platform > Audience), set the app to \"In production\", then "
            f"sign in again: {link}")


def _service_account(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"oauth.service_account_file {path} cannot be read as a Google "
                          f"service account key (JSON): {err}", code="config.oauth.key") from err
    if not isinstance(data, dict) or "private_key" not in data or "client_email" not in data:
        raise ConfigError(f"{path} is not a service account key (no private_key/client_email);"
                          " create a JSON key for the service account in Google Cloud console",
                          code="config.oauth.key")
    return {str(k): str(v) for k, v in data.items()}


def _sign_assertion(key: dict[str, str], token_url: str, subject: str | None,
                    scopes: tuple[str, ...], now: float) -> str:
    """RFC 7523 JWT for Google's domain-wide delegation: the service account (iss) acts for
    the Workspace user (sub) with the scopes the admin allowed for its client id."""
    import warnings

    from joserfc.jwk import RSAKey

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        from authlib.oauth2.rfc7523.assertion import sign_jwt_bearer_assertion

    signed = sign_jwt_bearer_assertion(
        RSAKey.import_key(key["private_key"]), issuer=key["client_email"], audience=token_url,
        subject=subject, issued_at=int(now), expires_in=3600,
        claims={"scope": " ".join(scopes)},
        header={"alg": "RS256", **({"kid": key["private_key_id"]}
                                   if key.get("private_key_id") else {})})
    return signed.decode() if isinstance(signed, bytes) else str(signed)

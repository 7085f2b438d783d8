"""Signing in: the ways a grant is made, and withdrawn.

- Authorization code with PKCE (RFC 7636) and ``state``, through Postroom's HTTP server:
  :func:`start` makes the provider's URL (``GET /oauth/start/{connection}`` redirects there),
  :func:`finish` takes the callback (``/oauth/callback``) and stores the tokens. The state
  and the PKCE verifier wait in the database, so any node may receive the callback.
- Device code (RFC 8628) for machines without a browser: :func:`device_start` and
  :func:`device_wait` (``postroom oauth login CONN --device``).
- Client credentials (Microsoft Graph app-only) and Google service accounts need no sign-in:
  the first delivery gets a token (:func:`app_only`).
- :func:`revoke`: RFC 7009 at the provider where it has an endpoint, then forget the grant.

Whoever finishes a sign-in decides which account a connection sends as, so before a new
grant replaces the old one :func:`finish` and :func:`device_wait` ask who signed in (the ID
token, else the provider's profile call) and compare it with the account the connection
names (SMTP ``username``, Graph ``mailbox``, Gmail ``user``). Another account: the new
tokens are dropped, the old grant stays, and the error names both accounts.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postroom.events import Kind
from postroom.exceptions import ConfigError
from postroom.oauth import client as oauth_client
from postroom.oauth import errors
from postroom.oauth.client import DeviceCode
from postroom.oauth.errors import GrantError
from postroom.oauth.store import Grant, Pending
from postroom.oauth.tokens import TokenManager
from postroom.settings import ConnectionBase


@dataclass(frozen=True)
class Started:
    url: str  # the provider's authorization URL
    state: str  # the OAuth state it carries (the web page binds it to the browser)


def start(tm: TokenManager, name: str) -> str:
    """The provider's authorization URL for ``name``; its state and PKCE verifier are kept
    for :func:`finish`."""
    return begin(tm, name).url


def begin(tm: TokenManager, name: str) -> Started:
    """:func:`start`, also returning the state."""
    _, cfg = tm.config(name)
    if cfg.grant != "user":
        raise ConfigError(
            f"connection {name!r} uses grant = {cfg.grant!r}: there is nobody to sign in; "
            "Postroom gets its tokens by itself (see `postroom oauth status`)",
            code="config.oauth.no_signin")
    ep = tm.endpoints(name)
    if not ep.authorize_url:
        raise ConfigError(f"connection {name!r}: oauth has no authorize_url (nor a discovery "
                          "document that names one); add it, or sign in with --device",
                          code="config.oauth.endpoints")
    client = tm.client(name, redirect=True)
    verifier = secrets.token_urlsafe(64)  # RFC 7636 4.1: 43-128 characters
    state = secrets.token_urlsafe(24)
    url, _ = client.create_authorization_url(
        ep.authorize_url, state=state, code_verifier=verifier if ep.provider.pkce else None,
        **ep.authorize_params)
    tm.store.add_pending(Pending(state, name, verifier, tm.redirect_uri(name), tm.clock()))
    return Started(str(url), state)


@dataclass(frozen=True)
class Finished:
    connection: str
    grant: Grant
    warnings: list[str]


def finish(tm: TokenManager, params: dict[str, str]) -> Finished:
    """Complete an authorization from the callback's query parameters."""
    state = params.get("state", "")
    pending = tm.store.take_pending(state, tm.clock()) if state else None
    if pending is None:
        names = [c.name for c in tm.connections()]
        how = (tm.start_link(names[0]) if len(names) == 1 else
               f"{tm.public_url}/oauth/start/NAME, or run `postroom oauth login NAME`")
        raise GrantError(
            "this sign-in link was already used, is older than 15 minutes, or was started by "
            f"another Postroom database: start again at {how}", code="oauth.state_unknown")
    name = pending.connection
    ctx = tm.context(name)
    fill = {"link": ctx.link, "console": ctx.console, "redirect_uri": pending.redirect_uri,
            "scopes": ctx.scopes}
    if "error" in params:
        err = params["error"]
        said = f"{err}: {params.get('error_description', '')}".rstrip(": ")
        key = errors.classify(err, params.get("error_description"))
        if not key:
            raise GrantError(f"connection {name}: the provider refused the sign-in: {said}",
                             code="oauth.authorize")
        raise errors.failure(key, name, said=said, **fill)
    code = params.get("code")
    if not code:
        raise GrantError(f"connection {name}: the callback carries neither code nor error; "
                         f"start again at {ctx.link}", code="oauth.callback")
    client = tm.client(name, redirect=True)
    client.redirect_uri = pending.redirect_uri  # must equal the one of the authorization
    ep = tm.endpoints(name)
    extra: dict[str, Any] = {"code_verifier": pending.verifier} if ep.provider.pkce else {}
    token = oauth_client.call(
        lambda: client.fetch_token(ep.token_url, grant_type="authorization_code", code=code,
                                   **extra), ctx)
    return keep(tm, name, token, "authorization_code")


def configured_account(conn: ConnectionBase) -> tuple[str, str] | None:
    """(setting, value) of the account the connection says it sends as, if it names one:
    SMTP ``username``, Gmail ``user``, Graph ``mailbox`` ("me" names nobody)."""
    for key in ("username", "mailbox", "user"):
        value = getattr(conn, key, None)
        if isinstance(value, str) and value.strip() and value.strip().lower() != "me":
            return key, value.strip()
    return None


def keep(tm: TokenManager, name: str, token: Any, grant_type: str) -> Finished:
    """Store what a sign-in returned, if the account that signed in is the connection's."""
    conn, cfg = tm.config(name)
    ep = tm.endpoints(name)
    who = oauth_client.signed_in_accounts(token, cfg, conn.transport, transport=tm.transport)
    want = configured_account(conn)
    notes: list[str] = []
    if want is not None and who and want[1].casefold() not in {w.casefold() for w in who}:
        raise _wrong_account(tm, name, want, who[0])
    if want is not None and not who:
        notes.append(
            f"{ep.provider.title} did not say which account signed in, so Postroom could not "
            f"check that it is {want[1]} (the connection's {want[0]}); if it was another "
            f"one, sign in again as {want[1]}")
    elif want is None and who:
        notes.append(
            f"connection {name} names no account (username, mailbox or user), so it now "
            f"sends as {who[0]}, whoever signed in; name the account in its configuration "
            "to have Postroom refuse a sign-in by any other")
    # Of the names the provider gave (user principal name, address...), the one configured.
    same = [w for w in who if want is not None and w.casefold() == want[1].casefold()]
    grant = tm.save(name, token, grant_type, account=next(iter(same or who), None))
    for note in notes:
        tm.event(Kind.OAUTH_ACCOUNT_NOTE, name, note)
    return Finished(name, grant, notes + [w for _, w in tm.warnings(grant)])


def _wrong_account(tm: TokenManager, name: str, want: tuple[str, str],
                   got: str) -> GrantError:
    setting, account = want
    old = tm.store.get(name)
    kept = (f"its grant for {old.account or 'the earlier sign-in'} stays in place"
            if old is not None else "it stays without a grant")
    err = GrantError(
        f"connection {name} sends as {account} (its {setting}), but the sign-in was made by "
        f"{got}. The new tokens were not stored: {kept}. Fix: sign in as {account} (open a "
        f"new link from `postroom oauth login {name}`, in a private window if this browser "
        f"is signed in to {got} at the provider); or, if {name} should send as {got}, change "
        f"its {setting} to {got} first", code="oauth.account_mismatch")
    tm.event(Kind.OAUTH_ACCOUNT_REFUSED, name, err.message)
    return err


def device_start(tm: TokenManager, name: str) -> DeviceCode:
    _, cfg = tm.config(name)
    ep = tm.endpoints(name)
    if not ep.device_url:
        raise ConfigError(
            f"connection {name!r}: {ep.provider.title} has no device-code sign-in (or oauth "
            "has no device_url); use the browser link: `postroom oauth login "
            f"{name}`", code="config.oauth.no_device")
    refused = [s for s in ep.scopes if s in ep.provider.device_refuses]
    if refused:
        raise ConfigError(
            f"connection {name!r}: {ep.provider.title} does not allow the scope(s) "
            f"{', '.join(refused)} in the device-code flow; sign in with the browser link "
            f"instead (`postroom oauth login {name}` prints it; the browser may run on "
            "another machine if it can reach the redirect URI)", code="config.oauth.no_device")
    client = tm.client(name)
    return oauth_client.device_authorization(client, ep, cfg, tm.context(name))


def device_wait(tm: TokenManager, name: str, code: DeviceCode, *,
                sleep: Callable[[float], None] = time.sleep,
                tick: Callable[[float], None] | None = None) -> Finished:
    """Poll the token endpoint until the user approves, declines or the code expires
    (RFC 8628 3.5: authorization_pending, slow_down adds 5 s to the interval)."""
    ep = tm.endpoints(name)
    client = tm.client(name, scope=False)
    ctx = tm.context(name)
    interval = max(code.interval, 1.0)
    while True:
        left = code.expires_at - time.time()
        if left <= 0:
            raise errors.failure("expired_token", name, link=ctx.link)
        if tick is not None:
            tick(left)
        sleep(min(interval, max(left, 0.1)))
        try:
            token = oauth_client.call(
                lambda: client.fetch_token(ep.token_url, grant_type=oauth_client.DEVICE_GRANT,
                                           device_code=code.device_code), ctx)
        except GrantError as err:
            said = err.message
            if "authorization_pending" in said:
                continue
            if "slow_down" in said:
                interval += 5
                continue
            raise
        return keep(tm, name, token, "device_code")


def revoke(tm: TokenManager, name: str) -> str:
    """Withdraw the grant at the provider (RFC 7009) where it can, and forget it here."""
    ep = tm.endpoints(name)
    grant = tm.store.get(name)
    if grant is None:
        return f"connection {name} has no grant; nothing to revoke"
    said = ""
    if ep.revoke_url and (grant.refresh_token or grant.access_token):
        client = tm.client(name)
        # Revoking the refresh token withdraws the whole grant at Google and with RFC 7009
        # servers that follow its section 2.1 recommendation.
        token, hint = ((grant.refresh_token, "refresh_token") if grant.refresh_token
                       else (grant.access_token, "access_token"))
        try:
            resp = oauth_client.call(
                lambda: client.revoke_token(ep.revoke_url, token=token, token_type_hint=hint),
                tm.context(name))
            ok = 200 <= resp.status_code < 300
            said = (f"revoked at {ep.provider.title}" if ok else
                    f"{ep.provider.title} answered HTTP {resp.status_code} to the revocation")
        except GrantError as err:
            said = f"could not revoke at the provider ({err.message})"
    else:
        said = f"{ep.provider.title} has no revocation endpoint"
    tm.forget(name)
    tm.event(Kind.OAUTH_REVOKED, name, said)
    note = f"; {ep.provider.revoke_note}" if ep.provider.revoke_note else ""
    return f"connection {name}: grant removed from Postroom; {said}{note}"

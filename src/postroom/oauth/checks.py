"""The proactive check of every OAuth connection, so that a dying grant is known before mail
piles up behind it.

For each connection with an ``oauth`` table: is there a grant; does a refresh work (done at
most once a day per grant: it also keeps Microsoft's 90-day inactivity clock from running
out); does the grant hold the permission to send. Findings become events (for alerts),
each kind at most once a day per connection:

- ``oauth_grant_dead``: the provider refused the refresh token (``invalid_grant``...): the
  detail has the sign-in link. Raised by the token manager the moment it happens, whether a
  delivery or this check found it; ``oauth_testing_app`` beside it when a Google grant died at
  the age of a "Testing" app's refresh tokens (7 days);
- ``oauth_idle``: a Microsoft grant had not been refreshed for 80 days (90 kill it);
- ``oauth_scope_missing``: the grant lacks the send permission;
- ``oauth_no_grant``: the connection was never signed in.

Call :func:`run_checks` every ``[oauth] check_interval`` seconds from a worker (see
:func:`periodic`); several workers and nodes may all run it: a refresh happens once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from postroom.events import Kind
from postroom.exceptions import PostroomError
from postroom.oauth import errors
from postroom.oauth.tokens import TokenManager

log = logging.getLogger(__name__)
REFRESH_EVERY = 86400.0  # prove that the refresh token works at least this often
ONCE_A_DAY = 86400.0
IDLE_WARN_BEFORE_DAYS = 10


@dataclass(frozen=True)
class Check:
    connection: str
    ok: bool
    state: str  # ok | warning | dead | no_grant | error
    detail: str


def check_one(tm: TokenManager, name: str) -> Check:
    _, cfg = tm.config(name)
    ep = tm.endpoints(name)
    now = tm.clock()
    grant = tm.store.get(name)
    if grant is None and cfg.grant == "user":
        detail = errors.failure("no_grant", name, **tm.relogin(name)).message
        tm.event(Kind.OAUTH_NO_GRANT, name, detail, unless_within=ONCE_A_DAY)
        return Check(name, False, "no_grant", detail)
    idle_days = ep.provider.refresh_idle_days
    if grant is not None and grant.user and idle_days:
        last = grant.last_refresh_at or grant.granted_at
        idle = (now - last) / 86400
        if idle >= idle_days - IDLE_WARN_BEFORE_DAYS:
            tm.event(Kind.OAUTH_IDLE, name, (
                f"connection {name}: the refresh token was last used {idle:.0f} days ago; "
                f"{ep.provider.title} ends refresh tokens unused for {idle_days} days (was "
                "Postroom stopped?). Refreshing it now; if that fails, sign in again: "
                f"{tm.relogin(name).get('signin') or tm.sign_in_link(name)}"),
                unless_within=ONCE_A_DAY)
    try:
        if grant is None or now - (grant.last_refresh_at or grant.granted_at) > REFRESH_EVERY:
            grant = tm.refresh_now(name)
        else:
            tm.token(name)  # refreshed only when it is about to expire
    except PostroomError as err:
        # A dead grant has raised its event already (tokens.TokenManager._failed).
        dead = isinstance(err, errors.GrantError) and err.dead
        return Check(name, False, "dead" if dead else "error", err.message)
    for kind, text in tm.warnings(grant):
        tm.event(kind, name, text, unless_within=ONCE_A_DAY)
        return Check(name, False, "warning", text)
    # The account that signed in, not the configured one: they differ, the server refuses.
    mismatch = tm.account_mismatch(name, grant)
    if mismatch is not None:
        tm.event(Kind.OAUTH_ACCOUNT_MISMATCH, name, mismatch, unless_within=ONCE_A_DAY)
        return Check(name, False, "warning", mismatch)
    exp = f"; access token valid until {grant.expires_at:.0f}" if grant.expires_at else ""
    who = grant.account or "an account the provider did not name"
    return Check(name, True, "ok", f"signed in as {who}{exp}")


async def run_checks(tm: TokenManager) -> list[Check]:
    """Check every OAuth connection once (in a thread: it talks to the providers)."""
    out = []
    for conn in tm.connections():
        try:
            out.append(await asyncio.to_thread(check_one, tm, conn.name))
        except PostroomError as err:  # a configuration error of one connection
            out.append(Check(conn.name, False, "error", err.message))
    for c in out:
        if not c.ok:
            log.warning("oauth check: %s: %s", c.connection, c.detail)
    return out


async def periodic(tm: TokenManager, stop: asyncio.Event,
                   on_result: Callable[[list[Check]], object] | None = None) -> None:
    """Run :func:`run_checks` now and every ``[oauth] check_interval`` seconds until ``stop``
    is set. Meant as a task beside a worker's delivery loop."""
    if not tm.connections():
        return
    interval = tm.settings.oauth.check_interval
    while not stop.is_set():
        try:
            results = await run_checks(tm)
            if on_result is not None:
                on_result(results)
        except Exception:  # the check must never take the worker down
            log.exception("oauth check failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)

"""``GET /oauth/start/{connection}`` and ``GET /oauth/callback`` on Postroom's HTTP server.

Whoever finishes a sign-in decides which account a connection sends as, so starting one is
allowed only from ``server.trusted_networks`` (this machine by default) or with a ticket:
the link `postroom oauth login` prints carries one, signed with the instance key and valid
for an hour. The callback needs no ticket: its ``state`` was made by a permitted start.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from postroom.exceptions import PostroomError

if TYPE_CHECKING:
    from postroom.oauth.tokens import TokenManager

router = APIRouter(prefix="/oauth", include_in_schema=False)
TICKET_SECONDS = 3600.0
_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def ticket(key: bytes, connection: str, now: float | None = None) -> str:
    """A signed permission to start a sign-in for ``connection`` within the next hour."""
    until = int((time.time() if now is None else now) + TICKET_SECONDS)
    mac = hmac.new(key, f"oauth-start:{connection}:{until}".encode(), hashlib.sha256)
    return f"{until}.{mac.hexdigest()[:32]}"


def _ticket_ok(key: bytes, connection: str, value: str, now: float) -> bool:
    until, _, mac = value.partition(".")
    if not until.isdigit() or int(until) < now:
        return False
    want = hmac.new(key, f"oauth-start:{connection}:{until}".encode(), hashlib.sha256)
    return hmac.compare_digest(want.hexdigest()[:32], mac)


def manager(request: Request) -> TokenManager:
    """The instance's TokenManager, made on first use from the server's settings."""
    state = request.app.state
    tm: TokenManager | None = getattr(state, "oauth", None)
    if tm is None:
        from postroom.oauth.tokens import TokenManager
        from postroom.runtime import key_file
        from postroom.secrets import load_or_create_key

        ctx = state.ctx
        tm = TokenManager(ctx.settings, ctx.queue.engine,
                          load_or_create_key(key_file(ctx.settings)))
        state.oauth = tm
    return tm


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}"
           "</title><style>body{font:16px/1.5 system-ui,sans-serif;max-width:44em;margin:3em "
           "auto;padding:0 1em}code{background:#eee;padding:0 .2em}</style>"
           f"<h1>{html.escape(title)}</h1>{body}</html>")
    return HTMLResponse(doc, status_code=status, headers=_NO_STORE)


def _trusted(request: Request, tm: TokenManager) -> bool:
    host = request.client.host if request.client else ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    nets = [ipaddress.ip_network(n, strict=False)
            for n in tm.settings.server.trusted_networks]
    return any(addr in n for n in nets)


@router.get("/start/{connection}")
async def start(connection: str, request: Request) -> Response:
    from postroom.oauth import flows

    tm = manager(request)
    key = tm.key
    given = request.query_params.get("ticket", "")
    if not _trusted(request, tm) and not _ticket_ok(key, connection, given, time.time()):
        return _page("Sign-in link needed", (
            "<p>Starting an OAuth sign-in from this address needs the link "
            f"<code>postroom oauth login {html.escape(connection)}</code> prints (it is "
            "valid for an hour). Run it on the Postroom machine and open that link.</p>"), 403)
    try:
        url = await asyncio.to_thread(flows.start, tm, connection)
    except PostroomError as err:
        return _page("Cannot start the sign-in", f"<p>{html.escape(err.message)}</p>", 400)
    return RedirectResponse(url, status_code=302, headers=_NO_STORE)


@router.get("/callback")
async def callback(request: Request) -> Response:
    from postroom.oauth import flows

    tm = manager(request)
    params = {k: v for k, v in request.query_params.items()}
    try:
        done = await asyncio.to_thread(flows.finish, tm, params)
    except PostroomError as err:
        hint = ""
        if err.code == "oauth.redirect_uri_mismatch":
            hint = ("<p>The redirect URI registered with the provider must be exactly the "
                    "one Postroom sends; <code>postroom oauth login NAME</code> prints it.</p>")
        return _page("Sign-in failed", f"<p>{html.escape(err.message)}</p>{hint}", 400)
    g = done.grant
    items = [f"<li>{html.escape(w)}</li>" for w in done.warnings]
    warn = f"<p><b>But:</b></p><ul>{''.join(items)}</ul>" if items else ""
    return _page("Signed in", (
        f"<p>Connection <code>{html.escape(done.connection)}</code> is signed in as "
        f"<b>{html.escape(g.account or 'an account the provider did not name')}</b> with "
        f"the scopes <code>{html.escape(' '.join(g.scopes))}</code>. Postroom keeps the "
        "tokens encrypted and renews them by itself; mail that waited for a sign-in is "
        f"retried now.</p>{warn}<p>You can close this window.</p>"))

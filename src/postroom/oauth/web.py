"""``GET /oauth/start/{connection}`` and ``GET /oauth/callback`` on Postroom's HTTP server.

Whoever finishes a sign-in decides which account a connection sends as, so these pages are
fenced three times:

- the ``Host`` the browser asked for must be a name Postroom is known by, and the client
  must be in ``server.admin_networks`` (postroom.ingress.hostcheck: DNS rebinding, and
  "may administer" as its own privilege, apart from "may relay");
- starting a sign-in always needs a ticket: the link `postroom oauth login` prints carries
  one, signed with the instance key, bound to the connection, valid for 15 minutes and good
  for one sign-in (used tickets are remembered in the database, across processes, nodes and
  restarts). The client's address is never enough: behind a same-host TLS proxy every
  internet client arrives as 127.0.0.1;
- the start sets a cookie bound to the OAuth ``state`` (an HMAC of it under the instance
  key); the callback refuses a state whose cookie this browser does not hold, so a callback
  link cannot be finished in another browser (login CSRF, RFC 6749 section 10.12).

The callback then checks who signed in (postroom.oauth.flows.keep).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import secrets
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from postroom.exceptions import PostroomError
from postroom.ingress import hostcheck
from postroom.oauth.store import PENDING_SECONDS

if TYPE_CHECKING:
    from postroom.oauth.tokens import TokenManager

router = APIRouter(prefix="/oauth", include_in_schema=False)
TICKET_SECONDS = 900.0
COOKIE_PATH = "/oauth"
_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _mac(key: bytes, text: str, size: int = 32) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:size]


def ticket(key: bytes, connection: str, now: float | None = None) -> str:
    """A signed permission to start one sign-in for ``connection`` within 15 minutes."""
    until = int((time.time() if now is None else now) + TICKET_SECONDS)
    nonce = secrets.token_hex(16)
    return f"{until}.{nonce}.{_mac(key, f'oauth-start:{connection}:{until}:{nonce}')}"


def check_ticket(key: bytes, connection: str, value: str, now: float) -> tuple[str, int] | str:
    """(nonce, expiry) of a ticket valid for ``connection``, else why it is not. Whether it
    was used already is the store's to say (GrantStore.use_ticket)."""
    if not value:
        return "this address needs the link `postroom oauth login {name}` prints"
    until, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not (until.isdigit() and nonce and mac) or not hmac.compare_digest(
            _mac(key, f"oauth-start:{connection}:{until}:{nonce}"), mac):
        return ("this link's ticket is not valid for connection {name} (altered, made for "
                "another connection or by another Postroom instance, or from an older version)")
    if int(until) < now:
        return "this link's ticket expired (a link is valid for 15 minutes)"
    return nonce, int(until)


def cookie_name(key: bytes, state: str) -> str:
    # One cookie per sign-in under way, so that two started in one browser do not collide.
    return f"postroom_oauth_{_mac(key, f'oauth-cookie-name:{state}', 16)}"


def cookie_value(key: bytes, state: str) -> str:
    return _mac(key, f"oauth-browser:{state}")


def manager(request: Request) -> TokenManager:
    """The instance's TokenManager, made on first use from the server's settings."""
    state = request.app.state
    tm: TokenManager | None = getattr(state, "oauth", None)
    if tm is None:
        from postroom.oauth.tokens import TokenManager
        from postroom.runtime import key_file
        from postroom.secrets import load_or_create_key

        ctx = state.ctx
        # under `postroom serve`, the instance's manager: it follows the live reload, so a
        # connection made in the web admin can be signed in without a restart
        inst = getattr(ctx, "instance", None)
        tm = inst.oauth if inst is not None else TokenManager(
            ctx.settings, ctx.queue.engine, load_or_create_key(key_file(ctx.settings)))
        state.oauth = tm
    return tm


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}"
           "</title><style>body{font:16px/1.5 system-ui,sans-serif;max-width:44em;margin:3em "
           "auto;padding:0 1em}code{background:#eee;padding:0 .2em}</style>"
           f"<h1>{html.escape(title)}</h1>{body}</html>")
    return HTMLResponse(doc, status_code=status, headers=_NO_STORE)


def _fenced(request: Request, tm: TokenManager) -> Response | None:
    """The refusal page for a wrong Host or a client outside admin_networks, else None."""
    why = hostcheck.host_refusal(tm.settings, request.headers.get("host"))
    if why is not None:
        return _page("Wrong address", f"<p>{html.escape(why)}.</p>", hostcheck.MISDIRECTED)
    why = hostcheck.admin_refusal(tm.settings, request.client.host if request.client else None)
    if why is not None:
        return _page("Not allowed from here", f"<p>{html.escape(why)}.</p>", 403)
    return None


def _login_hint(connection: str) -> str:
    return (f"<p>Run <code>postroom oauth login {html.escape(connection)}</code> on the "
            "Postroom machine and open the new link it prints.</p>")


@router.get("/start/{connection}")
async def start(connection: str, request: Request) -> Response:
    from postroom.oauth import flows

    tm = manager(request)
    refused = _fenced(request, tm)
    if refused is not None:
        return refused
    checked = check_ticket(tm.key, connection, request.query_params.get("ticket", ""),
                           tm.clock())
    if isinstance(checked, str):
        why = checked.replace("{name}", connection)
        return _page("Sign-in link needed", f"<p>Starting an OAuth sign-in: {html.escape(why)}"
                     f".</p>{_login_hint(connection)}", 403)
    nonce, until = checked
    if not await asyncio.to_thread(tm.store.use_ticket, nonce, connection, until):
        return _page("Sign-in link already used", (
            "<p>Each link starts one sign-in, and this one has been opened before (a reload "
            f"or the back button does that too).</p>{_login_hint(connection)}"), 403)
    try:
        began = await asyncio.to_thread(flows.begin, tm, connection)
    except PostroomError as err:
        return _page("Cannot start the sign-in", f"<p>{html.escape(err.message)}</p>", 400)
    resp = RedirectResponse(began.url, status_code=302, headers=_NO_STORE)
    # SameSite=Lax: the provider's redirect back is a top-level GET, which still carries it;
    # Secure whenever the browser comes back over https (behind a TLS proxy too).
    secure = request.url.scheme == "https" or tm.redirect_uri(connection).startswith("https:")
    resp.set_cookie(cookie_name(tm.key, began.state), cookie_value(tm.key, began.state),
                    max_age=int(PENDING_SECONDS), path=COOKIE_PATH, secure=secure,
                    httponly=True, samesite="lax")
    return resp


@router.get("/callback")
async def callback(request: Request) -> Response:
    from postroom.oauth import flows

    tm = manager(request)
    refused = _fenced(request, tm)
    if refused is not None:
        return refused
    params = {k: v for k, v in request.query_params.items()}
    state = params.get("state", "")
    name = cookie_name(tm.key, state) if state else ""
    if state and not hmac.compare_digest(request.cookies.get(name, ""),
                                         cookie_value(tm.key, state)):
        # Checked before the state is used up: a forged callback cannot spend a real one.
        return _page("Sign-in not started in this browser", (
            "<p>This browser holds no sign-in with this <code>state</code>: it was started "
            "in another browser (or profile), finished here already, is older than 15 "
            "minutes, or the browser refused Postroom's cookie. Postroom finishes a sign-in "
            "only in the browser that started it, so that nobody can slip their own account "
            "into your connection with a link.</p><p>Start again with "
            "<code>postroom oauth login NAME</code> and open its link in this browser.</p>"),
            400)
    try:
        done = await asyncio.to_thread(flows.finish, tm, params)
    except PostroomError as err:
        hint = ""
        if err.code == "oauth.redirect_uri_mismatch":
            hint = ("<p>The redirect URI registered with the provider must be exactly the "
                    "one Postroom sends; <code>postroom oauth login NAME</code> prints it.</p>")
        title = ("Signed in as the wrong account" if err.code == "oauth.account_mismatch"
                 else "Sign-in failed")
        resp: Response = _page(title, f"<p>{html.escape(err.message)}</p>{hint}", 400)
    else:
        g = done.grant
        items = [f"<li>{html.escape(w)}</li>" for w in done.warnings]
        warn = f"<p><b>But:</b></p><ul>{''.join(items)}</ul>" if items else ""
        resp = _page("Signed in", (
            f"<p>Connection <code>{html.escape(done.connection)}</code> is signed in as "
            f"<b>{html.escape(g.account or 'an account the provider did not name')}</b> with "
            f"the scopes <code>{html.escape(' '.join(g.scopes))}</code>. Postroom keeps the "
            "tokens encrypted and renews them by itself; mail that waited for a sign-in is "
            f"retried now.</p>{warn}<p>You can close this window.</p>"))
    if name:
        resp.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="lax")
    return resp

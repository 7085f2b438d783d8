"""The web admin's fence, checked by the HTTP front (postroom.ingress.http_front) before any
page work, and the headers every admin answer carries.

Cheap and light on purpose: it runs for every request to ``/``, ``/admin...`` and
``/api/v1/admin...`` before FastAPI, Jinja2 or the accounts are loaded, so a client outside
``server.admin_networks`` or a DNS-rebinding page (a foreign ``Host``) costs the server a
set lookup and a small fixed answer.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from postroom.ingress import hostcheck
from postroom.settings import Settings

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

PAGES = "/admin"
API = "/api/v1/admin"
SESSION_COOKIE = "postroom_session"
# A request body read before its sender is known to be signed in: the login, setup and
# TOTP forms are a few hundred bytes.
ANONYMOUS_BODY = 64 * 1024
# Set in the ASGI scope's "state" by a handler whose answer must wait (a failed login):
# the front sends it after that many seconds, once the request no longer holds a slot.
DELAY_STATE = "postroom.admin.delay"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
    # every form post, and the Origin is what tells our own forms from another site's
    # (web.auth.same_origin). Other sites still get no Referer.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers without CSP level 2
    (b"cross-origin-opener-policy", b"same-origin"),
)
NO_STORE = (b"cache-control", b"no-store")


def is_admin(path: str) -> bool:
    """Whether the web admin (not the app API, not /healthz) answers ``path``."""
    return path in ("/", PAGES, API) or path.startswith((PAGES + "/", API + "/"))


def is_api(path: str) -> bool:
    return path == API or path.startswith(API + "/")


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def refusal(settings: Settings, scope: MutableMapping[str, Any],
            client: str) -> tuple[int, bytes, bytes] | None:
    """(status, content type, body) refusing this request, or None when it may go on: the
    client must be in server.admin_networks (403) and the ``Host`` a name Postroom is known
    by (421, DNS rebinding). JSON for the API, a small page otherwise."""
    status, title = 403, "Not allowed from here"
    why = hostcheck.admin_refusal(settings, client)
    if why is None:
        status, title = hostcheck.MISDIRECTED, "Wrong address"
        why = hostcheck.host_refusal(settings, _header(scope, b"host"))
    if why is None:
        from postroom.admin.config import AdminSettings

        if settings.section(AdminSettings).enabled:
            return None
        status, title = 404, "The web admin is off"
        why = ("this Postroom serves no web admin ([admin] enabled = false). Set [admin] "
               "enabled = true in postroom.toml and restart Postroom to use it")
    if is_api(scope["path"]):
        code = {403: "admin.network", 404: "admin.off"}.get(status, "admin.host")
        message, _, fix = why.partition(". ")
        body = {"error": {"code": code, "message": message, "fix": fix or message,
                          "field": None}}
        return status, b"application/json", json.dumps(body).encode()
    # No template engine here: this answer must stay cheap, and it is the same in every
    # language because the client is not allowed to choose anything yet.
    page = ("<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport "
            "content='width=device-width, initial-scale=1'>"
            f"<title>{title}</title><main><h1>{title}</h1><p>{html.escape(why)}.</p></main>"
            "</html>")
    return status, b"text/html; charset=utf-8", page.encode()


def guarded(send: Send, *, static: bool) -> Send:
    """``send`` with the security headers added to the answer; pages and JSON are never
    cached (they show one account's view), static files keep their own Cache-Control."""
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {k.lower() for k, _ in headers}
            headers += [h for h in SECURITY_HEADERS if h[0] not in present]
            if not static or b"cache-control" not in present:
                headers = [h for h in headers if h[0].lower() != b"cache-control"]
                headers.append(NO_STORE)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def carries_credentials(scope: MutableMapping[str, Any]) -> bool:
    """Whether the request claims to be signed in (a session cookie or an admin token);
    the claim is checked (web.auth.signed_in) before a larger body is read for it."""
    auth = _header(scope, b"authorization") or ""
    if auth[:7].lower() == "bearer " and auth[7:].strip().startswith("prt_"):
        return True
    return f"{SESSION_COOKIE}=" in (_header(scope, b"cookie") or "")

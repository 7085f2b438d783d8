"""Who is asking the web admin, and may they: the session cookie, the single sign-on header
of a trusted proxy, an admin API token; CSRF; the per-address throttle of sign-ins.

- Pages: :func:`page_actor` (a FastAPI dependency): no session sends the browser to the
  sign-in page, a role too low gets the 403 page. On any method but GET/HEAD it also checks
  the CSRF token and the Origin (so a page that forgets :func:`check_csrf` is still safe).
- JSON (``/api/v1/admin``): :func:`api_actor`: ``Authorization: Bearer prt_...`` (an admin
  API token, `postroom admin token`), or the session cookie, with ``X-CSRF-Token`` on any
  state-changing request.
- SSO: with ``[admin] sso_header`` set, a request whose TCP peer is in ``sso_proxies`` and
  carries the header is signed in as the account it names (created with ``sso_role`` when
  that is set); the header from any other address is ignored (and logged once): anyone can
  send a header.
- The session cookie ``postroom_session``: HttpOnly, SameSite=Strict, Path=/, Secure per
  ``[admin] secure_cookies``. The database holds its hash only (admin.sessions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from postroom.admin.accounts import Account, Accounts, generate_password
from postroom.admin.config import AdminSettings
from postroom.admin.sessions import Session, SessionKind, Sessions, csrf_ok
from postroom.admin.tokens import AdminTokens
from postroom.audit import Actor, ActorKind, Role
from postroom.exceptions import PostroomError
from postroom.ingress.guard import FailureLimiter, Networks, peer_key
from postroom.ingress.http_errors import HttpError
from postroom.secrets import LazyKey, load_or_create_key
from postroom.web import fence

if TYPE_CHECKING:
    from postroom.ingress.http_front import Context

log = logging.getLogger(__name__)
_WHO = "postroom_who"
_SAFE = ("GET", "HEAD", "OPTIONS")
_MAX_PEERS = 10000


class PageRefusal(PostroomError):
    """A page request that cannot go on: to the sign-in page (``login``), or a refusal page
    (``kind``: "forbidden", "csrf", "not_found") with ``status``."""

    code = "admin.refused"

    def __init__(self, kind: str, status: int, *, need: Role | None = None,
                 login: str | None = None) -> None:
        super().__init__(f"admin page refused: {kind}")
        self.kind = kind
        self.status = status
        self.need = need
        self.login = login  # the sign-in URL to redirect to


@dataclass(frozen=True)
class Who:
    """A request's signed-in account: the actor, its session (None for an API token), and a
    new session token when one was just made (SSO) for the answer to set as the cookie."""

    actor: Actor
    session: Session | None
    new_token: str | None = None


class AdminAuth:
    """The web admin's accounts, sessions, tokens and sign-in throttle, one per server."""

    def __init__(self, ctx: Context) -> None:
        from postroom.runtime import key_file

        settings = ctx.settings
        self.settings = settings
        self.admin = settings.section(AdminSettings)
        engine = ctx.queue.engine
        self.key = LazyKey(lambda: load_or_create_key(key_file(settings)))
        self.accounts = Accounts(engine, self.key, settings=self.admin)
        self.sessions = Sessions(engine, self.admin)
        self.tokens = AdminTokens(engine, self.key)
        server = settings.server
        # A failed sign-in from an address is answered ever later (like a bad API key),
        # and until that answer has gone out the address gets no other check: one argon2
        # verification at a time per address, and one per delay.
        self.failures = FailureLimiter(
            base_delay=server.auth_failure_delay,
            max_delay=max(server.auth_failure_delay, server.auth_failure_max_delay))
        self._busy: dict[str, float] = {}  # peer -> monotonic time its next try may start
        self.sso_proxies = Networks(self.admin.sso_proxies)
        self._sso_warned = False

    # -- the sign-in throttle --------------------------------------------------------------
    def try_begin(self, ip: str) -> bool:
        """Whether a sign-in from ``ip`` may be checked now (else: answer "busy")."""
        now = time.monotonic()
        key = peer_key(ip)
        if self._busy.get(key, 0.0) > now:
            return False
        if len(self._busy) >= _MAX_PEERS:
            self._busy = {k: t for k, t in self._busy.items() if t > now}
            if len(self._busy) >= _MAX_PEERS:
                return False  # a flood of addresses: refuse rather than grow
        self._busy[key] = now + 3600.0  # held while the check runs (ended by finish)
        return True

    def finish(self, ip: str, ok: bool) -> float:
        """The check from ``ip`` is done; returns how long its answer must wait."""
        key = peer_key(ip)
        if ok:
            self.failures.succeeded(ip)
            self._busy.pop(key, None)
            return 0.0
        self.failures.failed(ip)
        delay = self.failures.delay(ip)
        self._busy[key] = time.monotonic() + delay
        return delay

    # -- who is asking ---------------------------------------------------------------------
    def sso_name(self, headers: dict[str, str], ip: str) -> str | None:
        """The account the trusted proxy names, or None (no SSO, not from the proxy)."""
        header = self.admin.sso_header
        if not header:
            return None
        value = headers.get(header.lower(), "").strip()
        if not value:
            return None
        if ip not in self.sso_proxies:
            if not self._sso_warned:
                self._sso_warned = True
                log.warning("ignored the single sign-on header %s from %s: it is trusted only "
                            "from [admin] sso_proxies (%s); logged once", header, ip,
                            ", ".join(self.admin.sso_proxies))
            return None
        return value

    def _sso_account(self, name: str) -> Account | None:
        found = self.accounts.get(name)
        if found is not None or not self.admin.sso_role:
            return found
        # The account is made on its first visit; its password is random and never shown:
        # it signs in through the proxy only (an admin can set one with `admin passwd`).
        actor = Actor(kind=ActorKind.SSO.value, name=name, role=Role(self.admin.sso_role))
        try:
            return self.accounts.add(name, generate_password(), Role(self.admin.sso_role),
                                     actor=actor)
        except PostroomError as err:  # a name the accounts refuse, or made meanwhile
            log.warning("single sign-on: cannot create account %r: %s", name, err)
            return self.accounts.get(name)

    def identify(self, headers: dict[str, str], cookie: str | None, bearer: str | None,
                 ip: str, *, sso: bool = True) -> Who | None:
        """Who sends a request with these credentials (blocking: database reads). With
        ``sso`` (pages only) the proxy's header may open a session; the JSON side and the
        front's body limit go by the session it opened."""
        if bearer is not None:
            actor = self.tokens.check(bearer, ip)
            return Who(actor, None) if actor is not None else None
        session = self.sessions.lookup(cookie) if cookie else None
        named = self.sso_name(headers, ip) if sso else None
        new_token = None
        if named is not None and (session is None or
                                  session.account != named.strip().lower()):
            account = self._sso_account(named)
            if account is None:
                return None
            new_token, session = self.sessions.create(account, ip, kind=SessionKind.SSO)
        if session is None:
            return None
        kind = ActorKind.SSO if session.kind == SessionKind.SSO else ActorKind.ADMIN
        return Who(Actor(kind=kind.value, name=session.account, role=session.role, ip=ip),
                   session, new_token)

    def secure_cookie(self, request: Request) -> bool:
        mode = self.admin.secure_cookies
        if mode != "auto":
            return mode == "always"
        if self.settings.http.tls or request.url.scheme == "https":
            return True
        proto = request.headers.get("x-forwarded-proto", "").strip().lower()
        return proto == "https" and client(request) in self.sso_proxies

    def set_cookie(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(fence.SESSION_COOKIE, token, max_age=self.admin.session_max,
                            path="/", secure=self.secure_cookie(request), httponly=True,
                            samesite="strict")

    def clear_cookie(self, request: Request, response: Response) -> None:
        response.delete_cookie(fence.SESSION_COOKIE, path="/",
                               secure=self.secure_cookie(request), httponly=True,
                               samesite="strict")


def of(ctx: Context) -> AdminAuth:
    """The server's AdminAuth, made on the first admin request."""
    if ctx.admin is None:
        ctx.admin = AdminAuth(ctx)
    return ctx.admin


def client(request: Request) -> str:
    return request.client.host if request.client else ""


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


async def who(request: Request, *, api: bool = False) -> Who | None:
    """The request's signed-in account (found once per request), or None."""
    if hasattr(request.state, _WHO):
        cached: Who | None = getattr(request.state, _WHO)
        return cached
    auth = of(request.app.state.ctx)
    bearer = _bearer(request) if api else None
    headers = {k.lower(): v for k, v in request.headers.items()}
    found = await asyncio.to_thread(auth.identify, headers,
                                    request.cookies.get(fence.SESSION_COOKIE), bearer,
                                    client(request), sso=not api)
    setattr(request.state, _WHO, found)
    if found is not None:
        request.state.actor = found.actor
        request.state.session = found.session
        # A session the SSO header just opened: render.page sets its cookie.
        request.state.new_token = found.new_token
    return found


async def signed_in(ctx: Context, scope: dict[str, Any] | Any) -> bool:
    """Whether a request (its ASGI scope, body unread) holds a live session or a valid admin
    token: the HTTP front then reads a body up to [http] max_body_size, else 64 KB."""
    request = Request(scope)
    auth = of(ctx)
    headers = {k.lower(): v for k, v in request.headers.items()}
    found = await asyncio.to_thread(auth.identify, headers,
                                    request.cookies.get(fence.SESSION_COOKIE),
                                    _bearer(request) if fence.is_api(scope["path"]) else None,
                                    client(request), sso=False)
    return found is not None


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from a page of this server: its Origin (else
    its Referer), when the browser sent one, must name the Host it was sent to."""
    host = request.headers.get("host", "").strip().lower()
    origin = request.headers.get("origin")
    if origin is not None:
        if origin.strip().lower() == "null":
            return False
        return urlsplit(origin.strip()).netloc.lower() == host
    referer = request.headers.get("referer")
    if referer:
        return urlsplit(referer.strip()).netloc.lower() == host
    return True


async def _csrf_sent(request: Request) -> str | None:
    from postroom.web import forms

    header = request.headers.get("x-csrf-token")
    if header:
        return header
    try:
        return (await forms.form(request)).text("csrf", limit=128)
    except forms.FormError:
        return None


async def check_csrf(request: Request) -> None:
    """Refuse (the "form expired" page, 403) a state-changing page request without this
    session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) or from another
    origin."""
    if request.method in _SAFE:
        return
    found = await who(request)
    if not same_origin(request) or found is None or found.session is None or \
            not csrf_ok(found.session, await _csrf_sent(request)):
        raise PageRefusal("csrf", 403)


def _login_url(request: Request) -> str:
    """The sign-in page, coming back here after (for a GET), saying why when a session
    cookie was sent (it ended)."""
    from urllib.parse import urlencode

    query: dict[str, str] = {}
    if request.method == "GET":
        query["next"] = request.url.path + (f"?{request.url.query}" if request.url.query
                                            else "")
    if fence.SESSION_COOKIE in request.cookies:
        query["expired"] = "1"
    return "/admin/login" + (f"?{urlencode(query)}" if query else "")


def page_actor(need: Role) -> Callable[[Request], Awaitable[Actor]]:
    """A dependency: the signed-in Actor of a page request that may see ``need`` pages."""
    async def dependency(request: Request) -> Actor:
        found = await who(request)
        if found is None:
            raise PageRefusal("login", 303, login=_login_url(request))
        await check_csrf(request)
        if not found.actor.may(need):
            raise PageRefusal("forbidden", 403, need=need)
        return found.actor

    return dependency


def api_actor(need: Role) -> Callable[[Request], Awaitable[Actor]]:
    """A dependency: the Actor of a JSON request (admin API token, or session cookie plus
    ``X-CSRF-Token`` on a state-changing request) allowed ``need``."""
    async def dependency(request: Request) -> Actor:
        found = await who(request, api=True)
        if found is None:
            raise HttpError(401, "admin.unauthenticated", "no valid admin credentials",
                            "send 'Authorization: Bearer prt_...' with a token from "
                            "`postroom admin token`, or sign in at /admin",
                            headers={"WWW-Authenticate": "Bearer"})
        if found.session is not None and request.method not in _SAFE and (
                not same_origin(request)
                or not csrf_ok(found.session, request.headers.get("x-csrf-token"))):
            raise HttpError(403, "admin.csrf", "missing or wrong X-CSRF-Token",
                            "send the session's CSRF token (the page's <meta "
                            "name=\"csrf-token\">) in X-CSRF-Token, or use an admin API token")
        if not found.actor.may(need):
            raise HttpError(403, "admin.role", f"this needs the {need.value} role",
                            "ask an administrator to give your account that role")
        return found.actor

    return dependency

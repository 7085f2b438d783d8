"""Signing in and out, and the first administrator from the setup link.

Sign-in: name and password, then (when the account has TOTP) a second step asking for the
code. Between the two steps the browser holds a ticket: the name and password encrypted
with a key derived from the instance key (Fernet: authenticated, so it cannot be altered),
valid 5 minutes; the password is never written into the page in the clear, and no server
state is kept, so the second step may reach any node.

Throttled twice: per address (web.auth: one check at a time, a failure answered ever
later, the answer held by the HTTP front without holding a request slot) and per account
(admin.accounts: locked after [admin] login_failures failures, in the database, for every
node). Failures are audited by admin.accounts (never the password).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response

from postroom.admin.accounts import Account, LoginRefused
from postroom.admin.setup import setup_pending, use_setup_token
from postroom.audit import Action, Actor, Role, record
from postroom.exceptions import ConfigError, PostroomError
from postroom.secrets import Vault, subkey
from postroom.web import auth, fence, forms
from postroom.web.render import page, translator

router = APIRouter(prefix=fence.PAGES, include_in_schema=False)
TICKET_SECONDS = 300
_TICKET_PURPOSE = b"postroom admin sign-in ticket v1"


def safe_next(value: str | None) -> str:
    """Where to go after signing in: an admin page of this server, never another site
    ("//evil.example" and "/\\evil" are other sites to a browser)."""
    if not value or not value.startswith(fence.PAGES) or "\\" in value or \
            any(c in value for c in "\r\n\t") or value.startswith(fence.PAGES + "/login"):
        return fence.PAGES + "/"
    return value


def _vault(admin: auth.AdminAuth) -> Vault:
    import base64

    return Vault(base64.urlsafe_b64encode(subkey(admin.key(), _TICKET_PURPOSE)))


def _ticket(admin: auth.AdminAuth, name: str, password: str) -> str:
    return _vault(admin).encrypt(json.dumps(
        {"n": name, "p": password, "e": time.time() + TICKET_SECONDS}))


def _open_ticket(admin: auth.AdminAuth, ticket: str) -> tuple[str, str] | None:
    if not ticket or len(ticket) > 4096 or not ticket.isascii():
        return None
    try:
        data = json.loads(_vault(admin).decrypt(ticket))
    except (ConfigError, ValueError):
        return None
    if not isinstance(data, dict) or float(data.get("e", 0)) < time.time():
        return None
    return str(data.get("n", "")), str(data.get("p", ""))


def _login_page(request: Request, *, status: int = 200, **values: Any) -> Response:
    defaults: dict[str, Any] = {"step": "password", "error": "", "name": "", "ticket": "",
                                   "next": fence.PAGES + "/", "signed_out": False,
                                   "expired": False}
    return page(request, "login.html", status=status, **{**defaults, **values})


@router.get("/login")
async def login_form(request: Request, next: Annotated[str, Query(max_length=2000)] = "",
                     expired: str = "", out: str = "") -> Response:
    found = await auth.who(request)
    if found is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, next=safe_next(next), expired=bool(expired),
                       signed_out=bool(out))


def _refuse(request: Request, admin: auth.AdminAuth, ip: str, error: str, *,
            failed: bool, **values: Any) -> Response:
    """The sign-in page again with ``error``; a failure's answer waits (fence.DELAY_STATE)."""
    delay = admin.finish(ip, ok=not failed)
    if delay > 0:
        request.scope.setdefault("state", {})[fence.DELAY_STATE] = delay
    return _login_page(request, status=401 if failed else 200, error=error, **values)


@router.post("/login")
async def login(request: Request) -> Response:
    admin = auth.of(request.app.state.ctx)
    ip = auth.client(request)
    if not auth.same_origin(request):
        return _login_page(request, status=403, error="origin")
    try:
        form = await forms.form(request)
        step = form.text("step")
        next_url = safe_next(form.text("next", limit=2000))
        ticket = form.text("ticket", limit=4096)
        code = form.text("code", limit=16)
        name = form.text("name", limit=200)
        password = form.text("password", limit=1024, strip=False)
    except forms.FormError:
        return _login_page(request, status=400, error="incomplete")
    if step == "totp":
        opened = _open_ticket(admin, ticket)
        if opened is None:
            return _login_page(request, status=400, error="expired", next=next_url)
        name, password = opened
    if not name or not password or (step == "totp" and not code):
        return _login_page(request, status=400, error="incomplete", name=name, next=next_url)
    if not admin.try_begin(ip):
        return _login_page(request, status=429, error="busy", name=name, next=next_url,
                           headers={"Retry-After": "5"})
    try:
        account = await asyncio.to_thread(admin.accounts.check, name, password,
                                          code or None, ip)
    except LoginRefused as err:
        if err.reason == "totp_needed":  # the password was right: the second step
            return _refuse(request, admin, ip, "", failed=False, step="totp",
                           ticket=_ticket(admin, name, password), next=next_url)
        if err.reason == "totp_bad":
            return _refuse(request, admin, ip, "totp_bad", failed=True, step="totp",
                           ticket=ticket, next=next_url)
        return _refuse(request, admin, ip, err.reason if err.reason == "locked" else "bad",
                       failed=True, name=name, next=next_url)
    except BaseException:
        admin.finish(ip, ok=True)  # not a failed guess: free the address for its next try
        raise
    admin.finish(ip, ok=True)
    return await _start_session(request, admin, account, next_url)


async def _start_session(request: Request, admin: auth.AdminAuth, account: Account,
                         next_url: str) -> Response:
    token, _ = await asyncio.to_thread(admin.sessions.create, account, auth.client(request))
    response = RedirectResponse(next_url, status_code=303)
    admin.set_cookie(request, response, token)
    return response


@router.post("/logout")
async def logout(request: Request,
                 actor: Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]) -> Response:
    """Ends this session (CSRF-checked by page_actor: a foreign page cannot sign you out)."""
    admin = auth.of(request.app.state.ctx)
    token = request.cookies.get(fence.SESSION_COOKIE, "")

    def end() -> None:
        admin.sessions.revoke(token)
        record(admin.accounts.engine, actor, Action.LOGOUT, f"account:{actor.name}")

    await asyncio.to_thread(end)
    response = RedirectResponse(fence.PAGES + "/login?out=1", status_code=303)
    admin.clear_cookie(request, response)
    return response


# -- the first administrator --------------------------------------------------------------
def _setup_page(request: Request, *, status: int = 200, **values: Any) -> Response:
    defaults: dict[str, Any] = {"refused": False, "error": "", "name": "", "token": ""}
    return page(request, "setup.html", status=status, **{**defaults, **values})


@router.get("/setup")
async def setup_form(request: Request,
                     token: Annotated[str, Query(max_length=200)] = "") -> Response:
    admin = auth.of(request.app.state.ctx)
    if not await asyncio.to_thread(setup_pending, admin.accounts.engine, token):
        return _setup_page(request, status=410, refused=True)
    return _setup_page(request, token=token)


@router.post("/setup")
async def setup(request: Request) -> Response:
    admin = auth.of(request.app.state.ctx)
    ip = auth.client(request)
    if not auth.same_origin(request):
        return _setup_page(request, status=403, refused=True)
    try:
        form = await forms.form(request)
        token = form.text("token", limit=200)
        name = form.text("name", limit=200)
        password = form.text("password", limit=1024, strip=False)
        again = form.text("password2", limit=1024, strip=False)
    except forms.FormError as err:
        return _setup_page(request, status=400, error=err.message)
    if not await asyncio.to_thread(setup_pending, admin.accounts.engine, token):
        return _setup_page(request, status=410, refused=True)
    gettext = translator(request)
    if not name or not password:
        return _setup_page(request, status=400, token=token, name=name,
                           error=gettext("Fill in the name and both passwords."))
    if password != again:
        return _setup_page(request, status=400, token=token, name=name,
                           error=gettext("The two passwords differ: type the same one twice."))
    try:
        account = await asyncio.to_thread(use_setup_token, admin.accounts.engine, token,
                                          name, password, ip=ip, accounts=admin.accounts)
    except PostroomError as err:
        if not await asyncio.to_thread(setup_pending, admin.accounts.engine, token):
            return _setup_page(request, status=410, refused=True)
        # The name or the password broke a rule: the accounts module says which and why.
        return _setup_page(request, status=400, token=token, name=name, error=err.message)
    return await _start_session(request, admin, account, fence.PAGES + "/")


"""The signed-in user's own account: change the password, turn TOTP on or off.

Both changes ask for the current password (a session left open on a shared screen is not
enough to lock its owner out or to take the account over), checked by admin.accounts, which
counts a wrong one toward the account's lockout like a failed sign-in. Accounts signed in
by single sign-on have no password to change here.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.admin.accounts import LoginRefused
from postroom.admin.sessions import SessionKind
from postroom.audit import Actor, ActorKind, Role
from postroom.web import auth, fence, forms, push
from postroom.web.ops_errors import Refused, attempt, submit
from postroom.web.render import page, translator

router = APIRouter(prefix=fence.PAGES, include_in_schema=False)
Signed = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
_NOTICES = ("password", "totp_on", "totp_off", "push_off")


def qr_data_uri(text: str) -> str:
    """``text`` as a QR code, an SVG ``data:`` URI (the CSP allows data: images); segno is
    pure Python (BSD-3-Clause), imported only when a QR code is drawn."""
    import segno

    return str(segno.make(text, error="m").svg_data_uri(scale=4, border=2))


async def _account_page(request: Request, actor: Actor, *, status: int = 200,
                        **values: Any) -> Response:
    admin = auth.of(request.app.state.ctx)
    account = await asyncio.to_thread(admin.accounts.get, actor.name)
    defaults: dict[str, Any] = {
        "notice": "", "error": "", "totp": bool(account and account.totp),
        "totp_secret": "", "totp_uri": "", "totp_qr": "",
        "sso": actor.kind == ActorKind.SSO.value,
        "push": await push.panel(request, actor),  # "Send alerts to this browser" (web.push)
    }
    return page(request, "account.html", status=status, **{**defaults, **values})


async def _refused(request: Request, actor: Actor, refused: Refused) -> Response:
    return await _account_page(request, actor, status=refused.status, error=refused.message)


# Passwords are taken as typed (spaces included); the other fields are trimmed.
_AS_TYPED = ("current", "password", "password2")


def _fields(form: forms.Form, *names: str) -> dict[str, str]:
    return {n: form.text(n, limit=1024, strip=n not in _AS_TYPED) for n in names}


@router.get("/account")
async def account_page(request: Request, actor: Signed, done: str = "") -> Response:
    return await _account_page(request, actor, notice=done if done in _NOTICES else "")


def _password_ok(admin: auth.AdminAuth, actor: Actor, password: str) -> bool:
    """Whether ``password`` is the account's (a TOTP request means it was: the code is not
    asked for here, the session already passed it)."""
    try:
        admin.accounts.check(actor.name, password, None, actor.ip or "")
    except LoginRefused as err:
        return err.reason == "totp_needed"
    return True


@router.post("/account/password")
async def change_password(request: Request, actor: Signed) -> Response:
    admin = auth.of(request.app.state.ctx)
    gettext = translator(request)
    got = await submit(request, lambda form: _fields(form, "current", "password", "password2"))
    if isinstance(got, Refused):
        return await _refused(request, actor, got)
    current, new, again = got["current"], got["password"], got["password2"]
    if new != again:
        return await _account_page(request, actor, status=400, error=gettext(
            "The two new passwords differ: type the same one twice."))
    if not await asyncio.to_thread(_password_ok, admin, actor, current):
        return await _account_page(request, actor, status=400, error=gettext(
            "The current password is wrong."))
    done = await attempt(admin.accounts.set_password, actor.name, new, actor=actor)
    if isinstance(done, Refused):
        return await _refused(request, actor, done)
    # A new password ends every session of the account, this one too: start a new one so
    # that the person who just changed it stays signed in.
    account = await asyncio.to_thread(admin.accounts.get, actor.name)
    response = RedirectResponse(fence.PAGES + "/account?done=password", status_code=303)
    if account is not None:
        token, _ = await asyncio.to_thread(admin.sessions.create, account, actor.ip or "",
                                           kind=SessionKind.PASSWORD)
        admin.set_cookie(request, response, token)
    return response


@router.post("/account/totp")
async def totp(request: Request, actor: Signed) -> Response:
    admin = auth.of(request.app.state.ctx)
    gettext = translator(request)
    got = await submit(request, lambda form: _fields(form, "action", "secret", "code", "current"))
    if isinstance(got, Refused):
        return await _refused(request, actor, got)
    action, secret, code, current = got["action"], got["secret"], got["code"], got["current"]
    if action == "begin":
        secret = await asyncio.to_thread(admin.accounts.totp_begin, actor.name)
        return await _enrol(request, admin, actor, secret)
    if action == "confirm":
        confirmed = await attempt(admin.accounts.totp_confirm, actor.name, secret, code,
                                  actor=actor)
        if isinstance(confirmed, Refused):
            return await _enrol(request, admin, actor, secret, status=400, error=gettext(
                "That code does not match. Check that the phone's clock is right and enter "
                "the code the app shows now."))
        return RedirectResponse(fence.PAGES + "/account?done=totp_on", status_code=303)
    if action == "disable":
        if not await asyncio.to_thread(_password_ok, admin, actor, current):
            return await _account_page(request, actor, status=400, error=gettext(
                "The current password is wrong."))
        await asyncio.to_thread(admin.accounts.totp_disable, actor.name, actor=actor)
        return RedirectResponse(fence.PAGES + "/account?done=totp_off", status_code=303)
    return await _account_page(request, actor, status=400, error=gettext(
        "Unknown action: reload the page and try again."))


async def _enrol(request: Request, admin: auth.AdminAuth, actor: Actor, secret: str, *,
                 status: int = 200, error: str = "") -> Response:
    uri = admin.accounts.totp_uri(actor.name, secret)
    return await _account_page(request, actor, status=status, error=error, totp_secret=secret,
                               totp_uri=uri, totp_qr=qr_data_uri(uri))

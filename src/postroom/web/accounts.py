"""The Accounts page (``/admin/accounts``): the web admin's accounts and their API tokens
(postroom.ops.accounts). Admins add an account (its password generated and shown once),
change a role, remove one (never the last admin), create a token (shown once) and revoke
one; viewers see the lists. Each person's own password and TOTP are on /admin/account."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from postroom.audit import Actor, Role
from postroom.ops import accounts as ops
from postroom.web import auth, fence
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt, submit
from postroom.web.render import page

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.page_actor(Role.ADMIN))]
HOME = fence.PAGES + "/accounts"
_DONE = ("role", "removed", "revoked")


async def _index(request: Request, actor: Actor, *, status_code: int = 200,
                 **values: Any) -> Response:
    inst = instance(request)
    accounts = await asyncio.to_thread(ops.list_accounts, inst, actor)
    tokens = await asyncio.to_thread(ops.list_tokens, inst, actor)
    ctx: dict[str, Any] = {"accounts": accounts, "tokens": tokens, "utc": utc, "done": "",
                           "name": "", "error": "", "made": None, "token": "",
                           "roles": [r.value for r in Role]}
    return page(request, "accounts/index.html", status=status_code, **{**ctx, **values})


def _back(done: str, name: str) -> Response:
    return RedirectResponse(f"{HOME}?{urlencode({'done': done, 'name': name})}",
                            status_code=303)


async def _fail(request: Request, actor: Actor, refused: Refused) -> Response:
    return await _index(request, actor, status_code=refused.status, error=refused.message)


@pages.get(HOME)
async def index(request: Request, actor: Viewer, done: str = "", name: str = "") -> Response:
    return await _index(request, actor, done=done if done in _DONE else "", name=name[:64])


@pages.post(HOME)
async def add(request: Request, actor: Admin) -> Response:
    inst = instance(request)
    made = await submit(request, lambda form: ops.add_account(
        inst, actor, form.text("name", limit=64), form.text("role", limit=16)))
    if isinstance(made, Refused):
        return await _fail(request, actor, made)
    return await _index(request, actor, made=made)


@pages.post(HOME + "/{name}/role")
async def role(request: Request, actor: Admin, name: str) -> Response:
    inst = instance(request)
    done = await submit(request, lambda form: ops.set_role(
        inst, actor, name, form.text("role", limit=16)))
    if isinstance(done, Refused):
        return await _fail(request, actor, done)
    return _back("role", name)


@pages.get(HOME + "/{name}/remove")
async def confirm_remove(request: Request, actor: Admin, name: str) -> Response:
    accounts = await asyncio.to_thread(ops.list_accounts, instance(request), actor)
    if not any(a.name == name for a in accounts):
        raise auth.PageRefusal("not_found", 404)
    return page(request, "accounts/remove.html", name=name)


@pages.post(HOME + "/{name}/remove")
async def remove(request: Request, actor: Admin, name: str) -> Response:
    done = await attempt(ops.remove_account, instance(request), actor, name)
    if isinstance(done, Refused):
        return await _fail(request, actor, done)
    return _back("removed", name)


@pages.post(HOME + "/tokens")
async def create_token(request: Request, actor: Admin) -> Response:
    inst = instance(request)
    token = await submit(request, lambda form: ops.create_token(
        inst, actor, form.text("account", limit=64), form.text("label", limit=200)))
    if isinstance(token, Refused):
        return await _fail(request, actor, token)
    return await _index(request, actor, token=token)


@pages.post(HOME + "/tokens/{token_id}/revoke")
async def revoke_token(request: Request, actor: Admin, token_id: str) -> Response:
    done = await attempt(ops.revoke_token, instance(request), actor, token_id)
    if isinstance(done, Refused):
        return await _fail(request, actor, done)
    return _back("revoked", token_id)

"""``/api/v1/admin/accounts`` and ``/api/v1/admin/tokens``: admin accounts and their API
tokens (postroom.ops.accounts). A generated password and a new token are in the answer that
made them only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from postroom.admin.accounts import Account
from postroom.audit import Actor, Role
from postroom.ops import accounts as ops
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]


class AccountOut(BaseModel):
    name: str
    role: Role
    created_at: float
    last_login_at: float | None = None
    totp: bool = Field(description="Whether signing in also asks for a TOTP code.")


class AccountIn(BaseModel):
    name: str = Field(max_length=64)
    role: Role = Role.VIEWER
    password: str | None = Field(default=None, max_length=1024,
                                 description="Omit to have one generated (returned once).")


class NewAccountOut(BaseModel):
    account: AccountOut
    password: str | None = Field(description="The generated password (shown this once); "
                                 "null when the request gave one.")


class RoleIn(BaseModel):
    role: Role


class TokenOut(BaseModel):
    id: str
    account: str
    label: str
    created_at: float
    last_used_at: float | None = None


class TokenIn(BaseModel):
    account: str = Field(max_length=64)
    label: str = Field(default="", max_length=200)


class NewTokenOut(BaseModel):
    token: str = Field(description="Authorization: Bearer <token>; shown this once.")


def account_out(a: Account) -> AccountOut:
    return AccountOut(name=a.name, role=a.role, created_at=a.created_at,
                      last_login_at=a.last_login_at, totp=a.totp)


@router.get("/accounts", summary="List admin accounts")
async def list_accounts(request: Request, actor: Viewer) -> list[AccountOut]:
    return [account_out(a) for a in await call(ops.list_accounts, instance(request), actor)]


@router.post("/accounts", status_code=201, summary="Add an admin account")
async def add_account(request: Request, actor: Admin, body: AccountIn) -> NewAccountOut:
    made = await call(ops.add_account, instance(request), actor, body.name, body.role,
                      password=body.password)
    return NewAccountOut(account=account_out(made.account),
                         password=None if body.password is not None else made.password)


@router.delete("/accounts/{name}", status_code=204, summary="Remove an admin account")
async def remove_account(request: Request, actor: Admin, name: str) -> Response:
    await call(ops.remove_account, instance(request), actor, name)
    return Response(status_code=204)


@router.put("/accounts/{name}/role", status_code=204, summary="Change an account's role")
async def set_role(request: Request, actor: Admin, name: str, body: RoleIn) -> Response:
    await call(ops.set_role, instance(request), actor, name, body.role)
    return Response(status_code=204)


@router.get("/tokens", summary="List admin API tokens")
async def list_tokens(request: Request, actor: Viewer,
                      account: str | None = None) -> list[TokenOut]:
    rows = await call(ops.list_tokens, instance(request), actor, account)
    return [TokenOut(**r) for r in rows]


@router.post("/tokens", status_code=201, summary="Create an admin API token")
async def create_token(request: Request, actor: Admin, body: TokenIn) -> NewTokenOut:
    token = await call(ops.create_token, instance(request), actor, body.account, body.label)
    return NewTokenOut(token=token)


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke an admin API token")
async def revoke_token(request: Request, actor: Admin, token_id: str) -> Response:
    await call(ops.revoke_token, instance(request), actor, token_id)
    return Response(status_code=204)

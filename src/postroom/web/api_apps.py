"""``/api/v1/admin/apps``: the apps' credentials and limits (postroom.ops.apps). A secret and
an API key are in the answer of POST /apps and POST /apps/{name}/rotate only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError
from postroom.ops import apps as ops
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call, http_error

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]


class AppOut(BaseModel):
    name: str
    created_at: float
    last_used_at: float | None = None
    rotated_at: float | None = None
    senders: list[str] = Field(description="Addresses or domains it may send as; [] = any.")
    connections: list[str] = Field(description="Connections it may use; [] = any.")
    rate: str | None = Field(description="At most this many messages per period, e.g. "
                             "100/hour; null = no limit.")


class AppIn(BaseModel):
    name: str = Field(max_length=64)
    senders: list[str] = Field(default=[], max_length=500)
    connections: list[str] = Field(default=[], max_length=500)
    rate: str | None = Field(default=None, max_length=40)


class LimitsIn(BaseModel):
    senders: list[str] | None = Field(default=None, max_length=500,
                                      description="null: unchanged; []: any sender.")
    connections: list[str] | None = Field(default=None, max_length=500,
                                          description="null: unchanged; []: any connection.")
    rate: str | None = Field(default=None, max_length=40, description="null: unchanged.")
    clear_rate: bool = Field(default=False, description="true: lift the rate limit.")


class CredentialsOut(BaseModel):
    name: str
    secret: str = Field(description="The SMTP AUTH password: shown this once.")
    api_key: str = Field(description="The HTTP API's Bearer key: shown this once.")


def app_out(row: dict[str, Any]) -> AppOut:
    return AppOut(name=row["name"], created_at=row["created_at"],
                  last_used_at=row["last_used_at"], rotated_at=row["rotated_at"],
                  senders=row["allowed_senders"] or [],
                  connections=row["allowed_connections"] or [], rate=row["rate_limit"])


def _credentials(made: ops.Credentials) -> CredentialsOut:
    return CredentialsOut(name=made.name, secret=made.secret, api_key=made.api_key)


@router.get("/apps", summary="List apps")
async def list_apps(request: Request, actor: Viewer) -> list[AppOut]:
    rows = await call(ops.list_apps, instance(request), actor)
    return [app_out(r) for r in rows]


@router.post("/apps", status_code=201, summary="Create an app")
async def add_app(request: Request, actor: Admin, body: AppIn) -> CredentialsOut:
    """Create an app; its secret and API key are in this answer only."""
    made = await call(ops.add_app, instance(request), actor, body.name, senders=body.senders,
                      connections=body.connections, rate=body.rate)
    return _credentials(made)


@router.post("/apps/{name}/rotate", summary="Give an app a new secret")
async def rotate_app(request: Request, actor: Admin, name: str) -> CredentialsOut:
    """The old secret stops working; the new one is in this answer only."""
    return _credentials(await call(ops.rotate_app, instance(request), actor, name))


@router.put("/apps/{name}/limits", summary="Change an app's limits")
async def set_limits(request: Request, actor: Admin, name: str, body: LimitsIn) -> AppOut:
    inst = instance(request)
    await call(ops.set_limits, inst, actor, name, senders=body.senders,
               connections=body.connections, rate=body.rate, clear_rate=body.clear_rate)
    rows = await call(ops.list_apps, inst, actor)
    return next(app_out(r) for r in rows if r["name"] == name)


@router.delete("/apps/{name}", status_code=204, summary="Remove an app")
async def remove_app(request: Request, actor: Admin, name: str) -> Response:
    if not await call(ops.remove_app, instance(request), actor, name):
        raise http_error(MessageError(f"no app named {name!r}", code="app.unknown"))
    return Response(status_code=204)

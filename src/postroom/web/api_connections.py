"""``/api/v1/admin`` connections, routes and the wizard's steps: the same functions as the
pages (postroom.ops.connections). Reading needs the viewer role; every change, the
wizard's network steps, a test send and a probe need an admin (a probe or plan makes this
server open connections to hosts the caller names)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.ingress.http_errors import HttpError
from postroom.ops import connections as ops
from postroom.web import auth, fence
from postroom.web.api import ERRORS
from postroom.web.dashboard import instance
from postroom.web.ops_errors import answer, call

router = APIRouter(prefix=fence.API, tags=["admin: connections"], responses=ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]


class ConnectionOut(BaseModel):
    name: str
    transport: str
    server: str | None = Field(description="host:port; null for an HTTP API transport")
    origin: str = Field(description="file: defined in postroom.toml (locked); database")
    health: str
    paused: bool
    failures: int
    last_error: str | None
    last_success_at: float | None
    oauth: bool
    oauth_state: str = Field(description="'' no OAuth; none; ok; dead (sign in again)")
    oauth_account: str | None
    oauth_expires_at: float | None


class ConnectionIn(BaseModel):
    entry: dict[str, Any] = Field(description="The [[connections]] table: name, transport, "
                                  "host, port... (no password, no *_env / *_file key)")
    secret: str | None = Field(None, max_length=4096,
                               description="Its password, stored encrypted; null keeps the "
                               "stored one, \"\" removes it")


class Saved(BaseModel):
    name: str


class TestIn(BaseModel):
    to: str = Field(max_length=320, description="Where the test message goes")


class TestOut(BaseModel):
    id: str
    to: str
    status: str = Field(description="sent, failed, deferred... or queued when not tried yet")
    attempts: list[dict[str, Any]] = Field(description="Each try, with its transcript")
    last_error: str | None


class PlanIn(BaseModel):
    address: str = Field(max_length=320)
    server: str = Field("", max_length=300, description="HOST[:PORT] to probe instead of "
                        "discovering (you vouch for it)")
    ca_file: str = Field("", max_length=1000, description="Absolute path of a CA bundle on "
                         "this server to trust too (a private server's CA)")


class CheckIn(BaseModel):
    entry: dict[str, Any]
    secret: str | None = Field(None, max_length=4096)


class CheckOut(BaseModel):
    ok: bool
    code: str | None = None
    message: str | None = None
    transcript: str | None = None


class Routes(BaseModel):
    file: list[dict[str, Any]] = Field(default_factory=list,
                                       description="Defined in postroom.toml: locked (read only)")
    stored: list[dict[str, Any]] = Field(description="Made here, in order")


@router.get("/connections", summary="List connections")
async def list_connections(request: Request, actor: Viewer) -> list[ConnectionOut]:
    views = await call(ops.list_connections, instance(request), actor)
    return [ConnectionOut(**v.to_dict()) for v in views]


@router.post("/connections", summary="Add a connection", status_code=201)
async def add_connection(request: Request, actor: Admin, body: ConnectionIn) -> Saved:
    name = await call(ops.save_connection, instance(request), actor, body.entry,
                      secret=body.secret, new=True)
    return Saved(name=name)


@router.put("/connections/{name}", summary="Replace a connection made here")
async def put_connection(request: Request, actor: Admin, name: str,
                         body: ConnectionIn) -> Saved:
    if body.entry.get("name", name) != name:
        raise HttpError(400, "config.invalid", "the entry's name differs from the address's",
                        "rename by adding the new one and deleting the old one")
    inst = instance(request)
    await call(ops.entry_of, inst, actor, name)  # exists, not the file's
    saved = await call(ops.save_connection, inst, actor, {**body.entry, "name": name},
                       secret=body.secret)
    return Saved(name=saved)


@router.delete("/connections/{name}", summary="Delete a connection made here")
async def delete_connection(request: Request, actor: Admin, name: str) -> Saved:
    await call(ops.delete_connection, instance(request), actor, name)
    return Saved(name=name)


@router.post("/connections/{name}/test", summary="Send a test message")
async def test_connection(request: Request, actor: Admin, name: str, body: TestIn) -> TestOut:
    ctx = request.app.state.ctx
    result = await answer(ops.test_send(instance(request), actor, name, body.to,
                                        on_enqueued=ctx.on_enqueued))
    return TestOut(**result)


@router.post("/connections/{name}/probe", summary="Probe a connection's server")
async def probe_connection(request: Request, actor: Admin, name: str) -> dict[str, Any]:
    return await answer(ops.probe_connection(instance(request), actor, name))


@router.post("/wizard/plan", summary="Find and probe the servers for an address")
async def wizard_plan(request: Request, actor: Admin, body: PlanIn) -> dict[str, Any]:
    plan = await call(ops.wizard_plan, instance(request), actor, body.address,
                      server=body.server, ca_file=body.ca_file)
    # chosen.concerns: what a person must confirm before saving the entry (the page asks)
    return plan.to_dict()


@router.post("/wizard/check", summary="Check a login (nothing is sent or saved)")
async def wizard_check(request: Request, actor: Admin, body: CheckIn) -> CheckOut:
    err = await answer(ops.check_login(instance(request), actor, body.entry, body.secret))
    if err is None:
        return CheckOut(ok=True)
    return CheckOut(ok=False, code=err.code, message=err.message, transcript=err.transcript)


@router.get("/routes", summary="The routes")
async def get_routes(request: Request, actor: Viewer) -> Routes:
    return Routes(**await call(ops.routes, instance(request), actor))


@router.put("/routes", summary="Replace the routes made here")
async def put_routes(request: Request, actor: Admin, body: Routes) -> Routes:
    inst = instance(request)
    await call(ops.save_routes, inst, actor, body.stored)
    return Routes(**await call(ops.routes, inst, actor))

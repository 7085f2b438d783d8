"""``/api/v1/admin/suppressions``: the suppression list (postroom.ops.suppressions). Viewers
list it; admins add, remove and import (a CSV or plain-text body)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.exceptions import MessageError
from postroom.ingress.http_errors import HttpError
from postroom.ops import suppressions as ops
from postroom.suppression import GLOBAL, Entry, Source, decode_cursor, encode_cursor
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call, http_error

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]
PAGE = 100
SCOPE_HELP = "* (every sender) or a sender domain, e.g. shop.example.com."
_IMPORT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "text/csv": {"schema": {"type": "string"}},
    "text/plain": {"schema": {"type": "string"}}}}}


class SuppressionOut(BaseModel):
    address: str = Field(description="Lower-cased, its domain as an A-label (IDNA).")
    scope: str = Field(description=SCOPE_HELP)
    reason: str
    source: Source
    created_at: float
    message_id: str | None = Field(default=None, description="The message whose bounce or "
                                   "complaint added it.")
    detail: str = ""


class SuppressionPage(BaseModel):
    rows: list[SuppressionOut]
    next_after: str | None = Field(description="Pass as ?after= for the next page; null on "
                                   "the last one.")


class SuppressionIn(BaseModel):
    address: str = Field(max_length=320)
    scope: str = Field(default=GLOBAL, max_length=255, description=SCOPE_HELP)
    reason: str = Field(default="", max_length=500)


class ImportLineError(BaseModel):
    line: int
    error: str


class ImportOut(BaseModel):
    added: int
    existing: int = Field(description="Listed already (left as they were).")
    bad_lines: int
    errors: list[ImportLineError] = Field(description=f"The first {ops.MAX_ERRORS} bad lines.")


def entry_out(e: Entry) -> SuppressionOut:
    return SuppressionOut(address=e.address, scope=e.scope, reason=e.reason,
                          source=Source(e.source), created_at=e.created_at,
                          message_id=e.message_id, detail=e.detail)


@router.get("/suppressions", summary="List the suppression list")
async def list_suppressions(
    request: Request, actor: Viewer,
    contains: Annotated[str | None, Query(max_length=320)] = None,
    scope: Annotated[str | None, Query(max_length=255)] = None,
    source: Source | None = None,
    after: Annotated[str | None, Query(max_length=2000)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = PAGE,
) -> SuppressionPage:
    """Newest first. ``contains``: part of the address; ``after``: the previous page's
    ``next_after``."""
    try:
        cursor = decode_cursor(after) if after else None
    except MessageError as err:
        raise http_error(err) from err
    rows = await call(ops.list_entries, instance(request), actor, contains=contains,
                      scope=scope, source=source.value if source else None, after=cursor,
                      limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return SuppressionPage(rows=[entry_out(r) for r in rows],
                           next_after=encode_cursor(rows[-1].cursor) if more and rows else None)


@router.post("/suppressions", status_code=201, summary="Suppress an address")
async def add_suppression(request: Request, actor: Admin, body: SuppressionIn
                          ) -> SuppressionOut:
    """Later mail to the address (from every sender, or from the scope's domain) is recorded
    as suppressed and not sent. 409 when it is listed in that scope already."""
    return entry_out(await call(ops.add_entry, instance(request), actor, body.address,
                                body.scope, body.reason))


@router.delete("/suppressions/{address}", status_code=204,
               summary="Remove an address from the suppression list")
async def remove_suppression(
    request: Request, actor: Admin, address: str,
    scope: Annotated[str, Query(max_length=255, description=SCOPE_HELP)] = GLOBAL,
    all_scopes: Annotated[bool, Query(description="Remove it from every scope.")] = False,
) -> Response:
    await call(ops.remove_entry, instance(request), actor, address,
               None if all_scopes else scope)
    return Response(status_code=204)


@router.post("/suppressions/import", summary="Import addresses into the suppression list",
             openapi_extra=_IMPORT_BODY)
async def import_suppressions(
    request: Request, actor: Admin,
    scope: Annotated[str, Query(max_length=255, description=SCOPE_HELP)] = GLOBAL,
    reason: Annotated[str, Query(max_length=500)] = "",
) -> ImportOut:
    """The body: CSV (``address[,scope[,reason]]``, a header row allowed) or one address
    per line, UTF-8, at most 5 MiB. Bad lines are skipped and listed; the rest are added."""
    data = await request.body()
    if len(data) > ops.MAX_IMPORT_BYTES:
        err = http_error(ops.too_big(len(data)))
        raise HttpError(413, err.code, err.message, err.fix)
    done = await call(ops.import_entries, instance(request), actor, data, scope=scope,
                      reason=reason)
    return ImportOut(added=done.added, existing=done.existing, bad_lines=done.bad_lines,
                     errors=[ImportLineError(line=n, error=e) for n, e in done.errors])

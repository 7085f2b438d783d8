"""``/api/v1/admin/audit``: the audit log, newest first, a page at a time (postroom.audit)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.ops import require
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
PAGE = 50


class AuditRow(BaseModel):
    id: int
    at: float
    actor: str = Field(description="kind:name, e.g. admin:alice, cli:root, token:alice.")
    action: str
    object: str
    detail: dict[str, Any] = Field(description="What changed; secrets are masked.")
    ip: str | None = None


class AuditPage(BaseModel):
    rows: list[AuditRow]
    next_before: int | None = Field(description="Pass as ?before= for the next page; null "
                                    "on the last one.")


def read_page(inst: Any, actor: Actor, *, since: float | None = None, who: str | None = None,
              action: str | None = None, obj: str | None = None, before: int | None = None,
              limit: int = PAGE) -> tuple[list[dict[str, Any]], int | None]:
    """One page of the audit log and the cursor of the next (None: this is the last)."""
    from postroom.audit import read

    require(actor, Role.VIEWER, "read the audit log")
    rows = read(inst.engine, since=since, actor=who or None, action=action or None,
                obj=obj or None, before=before, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1]["id"] if more and rows else None)


@router.get("/audit", summary="The audit log")
async def audit(request: Request, actor: Viewer, since: float | None = None,
                who: Annotated[str | None, Query(alias="actor", max_length=160)] = None,
                action: Annotated[str | None, Query(max_length=48)] = None,
                obj: Annotated[str | None, Query(alias="object", max_length=200)] = None,
                before: int | None = None,
                limit: Annotated[int, Query(ge=1, le=500)] = PAGE) -> AuditPage:
    """Newest first. ``actor``: admin:alice, alice or cli; ``action``: account.add or a group
    (account); ``since``: a Unix time."""
    rows, nxt = await call(read_page, instance(request), actor, since=since, who=who,
                           action=action, obj=obj, before=before, limit=limit)
    return AuditPage(rows=[AuditRow(**r) for r in rows], next_before=nxt)

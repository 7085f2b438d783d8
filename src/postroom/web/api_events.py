"""``/api/v1/admin/events``: the events (postroom.events), oldest first, a page at a time;
``after_id`` follows them (poll with the answer's ``last_id``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from postroom import events
from postroom.audit import Actor, Role
from postroom.ops import require
from postroom.web import api, auth, fence
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=api.ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
PAGE = 100


class EventRow(BaseModel):
    id: int
    at: float = Field(description="Unix time.")
    kind: str = Field(description="One of postroom.events.Kind: connection_down, "
                      "fallback_used, oauth_grant_dead...")
    severity: str = Field(description="info, warning or error.")
    subject: str = Field(description="What it is about: connection, message, queue or "
                         "oauth_grant.")
    message_id: str | None = None
    connection: str | None = None
    detail: str = ""


class EventsPage(BaseModel):
    events: list[EventRow] = Field(description="Oldest first.")
    older: int | None = Field(description="Pass as ?before_id= for the page before this one; "
                              "null when there is none.")
    last_id: int = Field(description="Pass as ?after_id= to get the events recorded since "
                         "(0: none yet).")


def read_page(inst: Any, actor: Actor, *, kinds: Sequence[str] = (), since: float | None = None,
              connection: str | None = None, message_id: str | None = None,
              after_id: int | None = None, before_id: int | None = None,
              limit: int = PAGE) -> tuple[list[events.Event], int | None, int]:
    """One page of events, the cursor of the page before it (None: none) and the id to
    follow from. ``kinds``: names as a user gave them (refused when unknown)."""
    require(actor, Role.VIEWER, "read the events")
    wanted = events.parse_kinds(kinds)
    backwards = after_id is None
    rows = events.read(inst.engine, since=since, kinds=wanted, connection=connection or None,
                       message_id=message_id or None, after_id=after_id,
                       before_id=before_id, limit=limit + 1 if backwards else limit)
    more = backwards and len(rows) > limit
    rows = rows[1:] if more else rows
    last = rows[-1].id if rows and rows[-1].id is not None else (
        after_id if after_id is not None else events.last_id(inst.engine))
    return rows, (rows[0].id if more else None), int(last or 0)


@router.get("/events", summary="Events: connections down, fallbacks, OAuth grants dying...")
async def list_events(
        request: Request, actor: Viewer,
        kind: Annotated[list[str] | None, Query(max_length=400)] = None,
        since: float | None = None,
        connection: Annotated[str | None, Query(max_length=64)] = None,
        message_id: Annotated[str | None, Query(max_length=32)] = None,
        after_id: int | None = None, before_id: int | None = None,
        limit: Annotated[int, Query(ge=1, le=events.READ_LIMIT)] = PAGE) -> EventsPage:
    """Oldest first. ``kind``: repeat it (or separate with commas); ``since``: a Unix time;
    ``before_id``: the page before (``older``); ``after_id``: what came after (``last_id``)."""
    rows, older, last = await call(read_page, instance(request), actor, kinds=kind or (),
                                   since=since, connection=connection, message_id=message_id,
                                   after_id=after_id, before_id=before_id, limit=limit)
    return EventsPage(events=[EventRow(**ev.as_dict()) for ev in rows], older=older,
                      last_id=last)

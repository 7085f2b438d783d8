"""The Events page (``/admin/events``): what happened that is worth knowing (connections down
and up, fallbacks used, OAuth grants dying...), newest first, filtered by kind, connection
and age, a page at a time (postroom.events.read, through the admin API's read_page)."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from postroom.audit import Actor, Role
from postroom.events import Kind
from postroom.web import auth, fence
from postroom.web.api_events import read_page
from postroom.web.audit import SINCE
from postroom.web.dashboard import instance, utc
from postroom.web.ops_errors import Refused, attempt
from postroom.web.render import page

pages = APIRouter(include_in_schema=False)
Viewer = Annotated[Actor, Depends(auth.page_actor(Role.VIEWER))]
HOME = fence.PAGES + "/events"
PAGE = 50


@pages.get(HOME)
async def index(request: Request, actor: Viewer,
                kind: Annotated[str, Query(max_length=32)] = "",
                connection: Annotated[str, Query(max_length=64)] = "",
                since: Annotated[str, Query(max_length=4)] = "",
                before: int | None = None) -> Response:
    params = {"kind": kind if kind in set(Kind) else "", "connection": connection.strip(),
              "since": since if since in SINCE else ""}
    start = time.time() - SINCE[params["since"]] if params["since"] else None
    found = await attempt(read_page, instance(request), actor,
                          kinds=[params["kind"]] if params["kind"] else [], since=start,
                          connection=params["connection"], before_id=before, limit=PAGE)
    error = found.message if isinstance(found, Refused) else ""
    rows, older_id = ([], None) if isinstance(found, Refused) else found[:2]
    kept = {k: v for k, v in params.items() if v}
    older = f"{HOME}?{urlencode({**kept, 'before': older_id})}" if older_id is not None else ""
    return page(request, "events/index.html", rows=rows[::-1], params=params, older=older,
                first=f"{HOME}?{urlencode(kept)}" if before is not None else "",
                error=error, kinds=list(Kind), since_choices=list(SINCE), utc=utc)
